"""What pyproject.toml cannot say: ``configs/`` (model configs, recipes, label sets) ships inside
the wheel as the package ``vtr_configs``, so an installed copy finds them without the checkout."""
from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["retrieval*", "indexer*", "app*"]) + ["vtr_configs"],
    package_dir={"vtr_configs": "configs"},
    package_data={
        "retrieval.models.ssm": ["*.c"],
        "vtr_configs": ["*/*.yaml", "*/*.txt"],
    },
)
