"""Which code ran: the git commit and the package versions. Imports nothing heavy, so a shell script
(docker/sweep-cluster.sh) asks the same function a sweep does, with any Python."""

import os
import subprocess


def git_commit(cwd: str | None = None) -> str:
    """The commit of the code that runs (this package's checkout, wherever the process runs from)."""
    # A job submitted to a cluster runs a copy of the code without .git: its submitter says.
    if os.environ.get("TUNE_GIT_COMMIT"):
        return os.environ["TUNE_GIT_COMMIT"]
    cwd = cwd or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    parts = []
    for pkg in ("torch", "ray", "mlflow", "optuna", "numpy"):
        try:
            parts.append(f"{pkg}={version(pkg)}")
        except PackageNotFoundError:
            pass
    return " ".join(parts)
