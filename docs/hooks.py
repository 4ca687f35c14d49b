"""mkdocs hook: the plots in benchmarks/results/ go into the site without a copy in docs/.

The benchmarks write their plots beside their tables; the guides show them as
`../benchmarks/results/NAME.png`, the path they get in the site here.
"""

import glob
import os

from mkdocs.structure.files import File

RESULTS = os.path.join("benchmarks", "results")


def on_files(files, config):
    root = os.path.dirname(config.config_file_path)
    for path in sorted(glob.glob(os.path.join(root, RESULTS, "*.png"))):
        files.append(File(os.path.relpath(path, root), src_dir=root, dest_dir=config.site_dir,
                          use_directory_urls=config.use_directory_urls))
    return files
