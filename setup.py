"""Packaging for gehirn-ts."""

from setuptools import find_packages, setup

setup(
    name="gehirn-ts",
    version="0.1.0",
    description="Programmable mail and event delivery daemon (twistd plugin)",
    python_requires=">=3.11",
    packages=[*find_packages(include=["gehirn_ts", "gehirn_ts.*"]), "twisted.plugins"],
    package_data={"gehirn_ts": ["py.typed"]},
    install_requires=[
        "Twisted[tls]>=24.3.0",
        "txamqp>=0.8.2",
        "treq>=23.11.0",
        "pyOpenSSL>=24.0.0",
        "service-identity>=24.1.0",
        # Without its [ed25519] extra: PyNaCl is not used (gehirn_ts/mta/libs.py).
        "dkimpy>=1.1.5",
        "pyspf>=2.0.14",
        "zope.interface>=6.0",
        "prometheus_client>=0.20.0",
        "authres>=1.2.0",
    ],
    extras_require={
        "test": [
            "pytest>=8.0",
            "hypothesis>=6.100",
            "standardwebhooks>=1.0.0",
            # Only to compare Ed25519 signatures with (tests/unit/test_libs.py).
            "PyNaCl>=1.5.0",
            "PyYAML>=6.0",
            "mypy>=1.10",
            "mypy-zope>=1.0",
            "ruff>=0.5",
            "types-PyYAML",
        ],
    },
    entry_points={
        "console_scripts": ["gehirn-ts=gehirn_ts.cli:main", "gehirn-tsd=gehirn_ts.launcher:main"]
    },
)
