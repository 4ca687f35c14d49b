"""griffe extensions for the API reference: how our docstrings are written, and that they are.

The docstrings follow Keras' layout, where the doctests stand unindented under a
last `Example:` heading; griffe's Google-style parser reads doctests only in an
indented `Examples:` section, and would render the `>>>` lines and their outputs
as Markdown.
"""

import ast
import inspect
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
            example = textwrap.indent(docstring.value[match.end() :].strip("\n"), "    ")
            docstring.value = docstring.value[: match.start()] + "Examples:\n" + example


class AssignedDocstrings(griffe.Extension):
    """Reads docstrings a module assigns from a template: `Name.__doc__ = TEMPLATE.format(...)`.

    Static analysis sees only literal docstrings; the factories that share one
    (MobileNetV3Small and MobileNetV3Large) assign theirs after the definition.
    """

    def on_module(self, *, mod, **kwargs):
        if mod.filepath is None or not str(mod.filepath).endswith(".py"):
            return
        tree = ast.parse(mod.filepath.read_text(encoding="utf-8"))
        templates = {
            node.targets[0].id: node.value.value
            for node in tree.body
            if isinstance(node, ast.Assign)
            and isinstance(node.targets[0], ast.Name)
            and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str)
        }
        for node in tree.body:
            target = node.targets[0] if isinstance(node, ast.Assign) else None
            if not (
                isinstance(target, ast.Attribute)
                and target.attr == "__doc__"
                and isinstance(target.value, ast.Name)
                and target.value.id in mod.members
            ):
                continue
            call = node.value
            if (
                isinstance(call, ast.Call)
                and isinstance(call.func, ast.Attribute)
                and call.func.attr == "format"
                and isinstance(call.func.value, ast.Name)
                and call.func.value.id in templates
            ):
                text = templates[call.func.value.id].format(
                    **{keyword.arg: ast.literal_eval(keyword.value) for keyword in call.keywords}
                )
                mod.members[target.value.id].docstring = griffe.Docstring(
                    inspect.cleandoc(text), lineno=node.lineno, parent=mod.members[target.value.id]
                )
