"""griffe extension for the API reference: our docstrings' `Example:` sections are doctests.

The docstrings follow Keras' layout, where the doctests stand unindented under a
last `Example:` heading; griffe's Google-style parser reads doctests only in an
indented `Examples:` section, and would render the `>>>` lines and their outputs
as Markdown.
"""

import re
import textwrap

import griffe

_EXAMPLE = re.compile(r"^Example:[ \t]*\n", flags=re.MULTILINE)


class ExampleSections(griffe.Extension):
    """Reads each docstring's closing `Example:` section as an `Examples:` section."""

    def on_object(self, *, obj, **kwargs):
        docstring = obj.docstring
        if docstring is None:
            return
        match = _EXAMPLE.search(docstring.value)
        if match:
            example = textwrap.indent(docstring.value[match.end():].strip("\n"), "    ")
            docstring.value = docstring.value[:match.start()] + "Examples:\n" + example
