"""Install pc_clip; every dependency and version is declared once, in settings.ini."""
from configparser import ConfigParser
from pathlib import Path

from setuptools import find_namespace_packages, setup

cfg = ConfigParser(delimiters=["="])
cfg.read(Path(__file__).parent / "settings.ini")
meta = cfg["DEFAULT"]


def _split(key: str) -> list[str]:
    return meta.get(key, "").split()


setup(
    name=meta["repo"],
    version=meta["version"],
    description=meta["description"],
    author=meta["author"],
    license="Apache-2.0",
    python_requires=f">={meta['min_python']}",
    # pc_clip.model_configs holds only the open_clip JSON configs: a namespace package, so setuptools ships it as one
    packages=find_namespace_packages(include=["pc_clip", "pc_clip.*"], exclude=["*.__pycache__"]),
    package_data={"pc_clip.model_configs": ["*.json"], "pc_clip.studies": ["*.csv"]},
    include_package_data=True,
    # the `pc-clip` kernel the notebooks name, for the Jupyter of the environment the package is installed into
    # (conda's environment.yml included); `make install` also registers it with --user, naming the checkout
    data_files=[("share/jupyter/kernels/pc-clip", ["share/jupyter/kernels/pc-clip/kernel.json"])],
    install_requires=_split("requirements"),
    extras_require={"dev": _split("dev_requirements"), "openai": _split("openai_requirements")},
    entry_points={
        "console_scripts": _split("console_scripts"),
        "nbdev": [f"{meta['lib_path']}={meta['lib_path']}._modidx:d"],
    },
    zip_safe=False,
)
