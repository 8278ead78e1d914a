"""The one version source: pyproject.toml reads it (setuptools `attr:`, statically), and so do
`ssm_kernels.__version__` and `python -m ssm_kernels --version`."""
__version__ = "0.1.0"
