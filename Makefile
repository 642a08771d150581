# Two commands on a fresh machine:  `make demo` (main job on the shipped defaults) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU build of torch, pinned here (setup.py only says torch>=2.4: GPU hosts bring their own torch).
TORCH  ?= torch==2.13.0
EXTRAS ?= test,train,onnx
export OMP_NUM_THREADS ?= 1

.PHONY: demo test venv system-deps bench clean docker-check

$(BIN)/.installed: setup.py pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check --upgrade pip
	$(BIN)/pip install -q --disable-pip-version-check "$(TORCH)"
	$(BIN)/pip install -q --disable-pip-version-check -e ".[$(EXTRAS)]"
	touch $@

venv: $(BIN)/.installed

system-deps:
	scripts/system-deps.sh

# Replay of the shipped sample raw file through the shipped default model (preset `fast`):
# complex ISMRMRD images in out/t1_coronal_x4_recon.h5, DICOM in out/dicom/, NIfTI, a labelled PNG preview
# and a zero-filled | SENSE | learned | std | difference picture in out/.
demo: venv
	$(BIN)/scoremri replay examples/t1_coronal_x4.h5 -o out/t1_coronal_x4_recon.h5 --png out/ \
	    --dicom out/dicom --nifti out/t1_coronal_x4_recon.nii.gz --compare out/

test: venv system-deps
	$(BIN)/python -m pytest -q tests

bench: venv system-deps
	$(BIN)/python benchmarks/coils.py --quick
	$(BIN)/python benchmarks/network.py --quick
	$(BIN)/python benchmarks/quality.py --quick

# The Docker deployment built and run for real (needs a Docker engine, docker-compose and root for the base
# image): CPU image, compose up, scans through Gadgetron compared with replay, down. Not part of CI (a cold
# build takes minutes). Prints build time, image size, start-up to healthy and seconds per scan.
docker-check: venv
	docker/check.sh

clean:
	rm -rf $(VENV) out .pytest_cache
