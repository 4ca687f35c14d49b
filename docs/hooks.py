"""mkdocs hooks: the benchmark plots, and a docstring on every public class and function.

The benchmarks write their plots beside their tables in benchmarks/results/; the
guides show them as `../benchmarks/results/NAME.png`, the path they get in the
site here, without a copy in docs/.
"""

import glob
import logging
import os
import sys

import griffe
from mkdocs.structure.files import File

RESULTS = os.path.join("benchmarks", "results")
# The modules of the API reference. Public: what a module's `__all__` lists, or
# else its names without a leading underscore that the package defines.
API_MODULES = (
    "layers",
    "models",
    "batch_norm",
    "complexity",
    "data",
    "export",
    "optimization",
    "training",
)

log = logging.getLogger("mkdocs.hooks.docstrings")


def on_pre_build(config):
    """Warns (so fails a strict build) for each public class or function without a docstring."""
    root = os.path.dirname(config.config_file_path)
    sys.path.insert(0, os.path.join(root, "docs"))
    try:
        from griffe_extensions import AssignedDocstrings
    finally:
        sys.path.pop(0)
    package = griffe.load(
        "keras_mgconv",
        search_paths=[root],
        allow_inspection=False,
        extensions=griffe.load_extensions(AssignedDocstrings),
    )
    for module_name in API_MODULES:
        module = package[module_name]
        for name, member in module.members.items():
            if name.startswith("_") or (module.exports is not None and name not in module.exports):
                continue
            try:
                target = member.final_target if member.is_alias else member
            except griffe.AliasResolutionError:
                continue  # Imported from outside the package.
            if target.kind.value in ("class", "function") and not target.docstring:
                log.warning(f"{target.path} has no docstring")


def on_files(files, config):
    root = os.path.dirname(config.config_file_path)
    for path in sorted(glob.glob(os.path.join(root, RESULTS, "*.png"))):
        files.append(
            File(
                os.path.relpath(path, root),
                src_dir=root,
                dest_dir=config.site_dir,
                use_directory_urls=config.use_directory_urls,
            )
        )
    return files
