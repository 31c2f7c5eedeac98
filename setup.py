"""Install pc_clip; every dependency and version is declared once, in settings.ini."""
from configparser import ConfigParser
from pathlib import Path

from setuptools import find_packages, setup

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
    packages=find_packages(include=["pc_clip", "pc_clip.*"]),
    package_data={"pc_clip": ["model_configs/*.json", "studies/*.csv"]},
    include_package_data=True,
    install_requires=_split("requirements"),
    extras_require={"dev": _split("dev_requirements"), "openai": _split("openai_requirements")},
    entry_points={
        "console_scripts": _split("console_scripts"),
        "nbdev": [f"{meta['lib_path']}={meta['lib_path']}._modidx:d"],
    },
    zip_safe=False,
)
