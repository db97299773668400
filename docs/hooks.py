"""MkDocs hook: reference sections rendered from the code at build time, so they are never written twice.

A page asks for one with a marker (an HTML comment, replaced wherever it stands):

- `<!-- generated:config -->`: every field of `deployments.config.AppConfig` and its nested models
  (type, constraints, default, description), one table per model;
- `<!-- generated:config-defaults -->`: the whole default `args` mapping as YAML;
- `<!-- generated:routes -->`: the HTTP routes the Router's FastAPI app serves;
- `<!-- generated:handle-methods -->`: the Router methods a Python handle can call, with signatures;
- `<!-- generated:metrics -->`: the Prometheus series `deployments/metrics.py` defines, and whether the app
  records them in this version (it imports that module) and serves `GET /metrics`;
- `<!-- generated:gpu-results -->`: where recorded GPU numbers are, if `benchmarks/README.md` holds any.

An unknown marker fails the build, and so does a marker the hook cannot render.
"""

from __future__ import annotations

import inspect
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

_MARKER = re.compile(r"<!-- generated:([a-z-]+) -->")


def on_config(config: Any) -> Any:
    # Snippet paths (`--8<-- "examples/..."`) are relative to the repository, wherever mkdocs runs from.
    snippets = config.mdx_configs.setdefault("pymdownx.snippets", {})
    snippets["base_path"] = [str(REPO)]
    return config


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    def render(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in _RENDERERS:
            raise ValueError(f"{page.file.src_path}: unknown generated section {name!r}")
        return _RENDERERS[name]()

    return _MARKER.sub(render, markdown)


# ---- the configuration reference ----------------------------------------------------------------------
def _yaml_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    return repr(value)


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is type(None):
        return "`null`"
    if origin is typing.Literal:
        return " or ".join(f"`{_yaml_value(arg)}`" for arg in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(arg) for arg in args)
    if origin in (list, tuple, dict):
        inner = ", ".join(_type_name(arg).strip("`") for arg in args)
        return f"`{origin.__name__}[{inner}]`"
    if isinstance(annotation, type):
        return f"`{annotation.__name__}`"
    return f"`{annotation}`"


def _constraints(field: Any) -> str:
    symbols = {"gt": ">", "ge": "≥", "lt": "<", "le": "≤", "max_length": "at most"}
    parts = []
    for item in field.metadata:
        for attr, symbol in symbols.items():
            value = getattr(item, attr, None)
            if value is not None:
                parts.append(f"{symbol} {value}" + (" items" if attr == "max_length" else ""))
    return f" ({', '.join(parts)})" if parts else ""


def _nested_model(annotation: Any) -> type[BaseModel] | None:
    """The model a field holds, also when it is optional (`AutoscalingConfig | None`)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        models = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        return _nested_model(models[0]) if len(models) == 1 else None
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def _anchor(path: str) -> str:
    return "cfg-" + path.replace(".", "-").replace("_", "-")


def _models(model: type[BaseModel], path: str) -> list[tuple[str, type[BaseModel]]]:
    """(dotted path, model) for `model` and every model nested in it, depth first."""
    found = [(path, model)]
    for name, field in model.model_fields.items():
        nested = _nested_model(field.annotation)
        if nested is not None:
            found += _models(nested, f"{path}.{name}" if path else name)
    return found


def _cell(text: str) -> str:
    """One table cell: a single line; outside code spans, markup characters are escaped (`|`, `<`, `*`)."""
    parts = " ".join(text.split()).split("`")
    for i in range(0, len(parts), 2):
        parts[i] = parts[i].replace("|", "\\|").replace("<", "&lt;").replace("*", "\\*")
    return "`".join(parts)


def render_config() -> str:
    from deployments.config import AppConfig

    sections = []
    for path, model in _models(AppConfig, ""):
        title = f"`{path}`" if path else "top level"
        lines = [f"### {title} {{#{_anchor(path or 'args')}}}", ""]
        doc = model.__dict__.get("__doc__")
        if doc:
            lines += [inspect.cleandoc(doc), ""]
        lines += [f"Model: `{model.__module__}.{model.__qualname__}`.", ""]
        lines += ["| Field | Type | Default | Description |", "|---|---|---|---|"]
        for name, field in model.model_fields.items():
            full = f"{path}.{name}" if path else name
            nested = _nested_model(field.annotation)
            if nested is not None:
                is_optional = field.annotation is not nested
                default = "`null`, " if is_optional else ""
                default += f"[see below](#{_anchor(full)})"
                kind = f"`{nested.__name__}`" + (" or `null`" if is_optional else "")
            else:
                kind = _type_name(field.annotation) + _constraints(field)
                default = (
                    "required"
                    if field.is_required()
                    else f"`{_yaml_value(field.get_default(call_default_factory=True))}`"
                )
            description = field.description or ""
            lines.append(f"| `{name}` | {_cell(kind)} | {_cell(default)} | {_cell(description)} |")
        sections.append("\n".join(lines))
    return "\n\n".join(sections)


def render_config_defaults() -> str:
    import yaml

    from deployments.config import AppConfig

    text = yaml.safe_dump(AppConfig().model_dump(mode="json"), sort_keys=False, width=100)
    return f"```yaml\n{text}```"


# ---- HTTP routes and handle methods -----------------------------------------------------------------------
def render_routes() -> str:
    from deployments.router import api

    rows = ["| Method | Path |", "|---|---|"]
    for path, operations in api.openapi()["paths"].items():
        rows += [f"| `{method.upper()}` | `{path}` |" for method in operations]
    return "\n".join(rows)


def _signature(function: Any) -> str:
    signature = inspect.signature(function)
    parameters = [p for name, p in signature.parameters.items() if name != "self"]
    text = str(signature.replace(parameters=parameters))
    return text.replace("typing.", "").replace("collections.abc.", "")


def render_handle_methods() -> str:
    from deployments.router import Router

    rows = ["| Method | Returns |", "|---|---|"]
    for name, function in inspect.getmembers(Router, inspect.isfunction):
        if name.startswith(("_", "http_")) or name == "health":  # HTTP-only handlers
            continue
        arguments, _, returns = _signature(function).partition(" -> ")
        rows.append(f"| `{name}{arguments}` | `{returns}` |")
    return "\n".join(rows)


def render_metrics() -> str:
    # Checked before this hook imports the module itself: does building the app import it?
    import deployments.app  # noqa: F401
    from deployments.router import api

    is_wired = "deployments.metrics" in sys.modules
    has_route = "/metrics" in api.openapi()["paths"]
    try:
        from deployments import metrics
    except ImportError:
        return "This version has no `deployments/metrics.py`: no Prometheus series of its own."
    lines = [
        "In this version, the app's modules "
        + (
            "**import** `deployments.metrics`"
            if is_wired
            else "do **not** import `deployments.metrics` yet"
        )
        + ", and the Router "
        + ("**serves** `GET /metrics`." if has_route else "does **not** serve `GET /metrics`."),
        "",
        "| Series | Kind | Labels | Meaning |",
        "|---|---|---|---|",
    ]
    for value in vars(metrics).values():
        if isinstance(value, metrics.Metric):
            spec = value.spec
            labels = ", ".join(f"`{key}`" for key in spec.tag_keys)
            lines.append(f"| `{spec.name}` | {spec.kind} | {labels} | {_cell(spec.description)} |")
    return "\n".join(lines)


def render_gpu_results() -> str:
    readme = REPO / "benchmarks" / "README.md"
    text = readme.read_text() if readme.exists() else ""
    if "H100" in text or "H200" in text:
        return "in the results table of `benchmarks/README.md`, with the card, model, load and commit of each"
    return "none recorded in the repository yet (`benchmarks/README.md` has no GPU rows)"


_RENDERERS = {
    "config": render_config,
    "config-defaults": render_config_defaults,
    "routes": render_routes,
    "handle-methods": render_handle_methods,
    "metrics": render_metrics,
    "gpu-results": render_gpu_results,
}
