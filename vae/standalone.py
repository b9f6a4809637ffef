"""The source of ``AutoencoderKLSSVAE`` as one self-contained module, for folders that must load without our code.

A diffusers model folder with an ``auto_map`` in its config (``make_self_contained``) loads through
``diffusers.AutoModel.from_pretrained(folder, trust_remote_code=True)`` from a module file inside it, and a diffusers
pipeline folder (``dit.export_pipeline``) can name custom component classes by a module file inside the
folder (``model_index.json``: ``"vae": ["autoencoder_kl_ssvae", "AutoencoderKLSSVAE"]`` and
``vae/autoencoder_kl_ssvae.py``); ``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`` imports that
file where only torch, diffusers and transformers are installed. diffusers copies the named file and the files it
imports relatively, but not their imports in turn, so the model must be one file.

That file is generated here from the very modules the model is built from (``vae.causal_conv`` ... ``vae
.diffusers_model``), in dependency order: their imports of our own packages are dropped (the names are defined
earlier in the same file), their other imports are hoisted to the top, and the few ``infra.config`` helpers they
use are copied by name. Nothing is maintained twice, and a name defined in two of the modules (which would make the
concatenation wrong) or an import of ours the bundle does not define stops the generation with that name.
"""
from __future__ import annotations

import ast
import importlib
import inspect
import json
from pathlib import Path

MODULE_NAME = "autoencoder_kl_ssvae"  # the file name (and so the model_index.json library name) in exported folders
CLASS_NAME = "AutoencoderKLSSVAE"
# In dependency order: every module only uses names defined by those before it.
MODULES = ("vae.causal_conv", "vae.layers", "vae.resample", "vae.config", "vae.encoder", "vae.decoder",
           "vae.posterior", "vae.model", "vae.inference", "vae.diffusers_model")
# From modules that carry more than the model needs (and import what an exported folder lacks): only these names.
PICKED = {"infra.config": ("ConfigError", "join_key", "check")}
OWN_PACKAGES = ("vae", "infra", "dit", "tools")


def _is_own(node: ast.ImportFrom) -> bool:
    return node.level > 0 or (node.module or "").split(".")[0] in OWN_PACKAGES


def _defined_names(node: ast.stmt) -> list[str]:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [node.name]
    targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
        node, (ast.AnnAssign, ast.AugAssign)) else []
    return [t.id for t in targets if isinstance(t, ast.Name)]


def _is_docstring(node: ast.stmt) -> bool:
    return isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)


def _segment(lines: list[str], node: ast.stmt) -> str:
    """A top-level statement's source lines, decorators included (ast's own segment starts after them)."""
    first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
    return "\n".join(lines[first - 1:node.end_lineno]) + "\n"


def standalone_source() -> str:
    """The generated module's source; raises ``ValueError`` naming a clash or an undefined import."""
    header: list[str] = []
    body: list[str] = []
    defined: dict[str, str] = {}  # name -> module that defines it
    needed: list[tuple[str, str]] = []  # (name, importing module): our names the bundle must define

    def define(name: str, module: str) -> None:
        if name in defined and defined[name] != module:
            raise ValueError(f"vae.standalone: {name!r} is defined by both {defined[name]} and {module}; the "
                             f"single-file bundle needs distinct top-level names")
        defined[name] = module

    sources = [(name, names) for name, names in PICKED.items()] + [(name, None) for name in MODULES]
    for module_name, only in sources:
        source = inspect.getsource(importlib.import_module(module_name))
        tree, lines = ast.parse(source), source.splitlines()
        body.append(f"\n\n# {'-' * 100} from {module_name}\n")
        for node in tree.body:
            if isinstance(node, ast.ImportFrom) and node.module == "__future__":
                continue
            if isinstance(node, ast.ImportFrom) and _is_own(node):
                for alias in node.names:
                    if alias.asname and alias.asname != alias.name:
                        raise ValueError(f"vae.standalone: {module_name} imports {alias.name} as {alias.asname}")
                    needed.append((alias.name, module_name))
                continue
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                if only is None:
                    line = ast.get_source_segment(source, node)
                    if line not in header:
                        header.append(line)
                continue
            if _is_docstring(node):
                continue
            names = _defined_names(node)
            if only is not None and not set(names) & set(only):
                continue
            for name in names:
                define(name, module_name)
            body.append(_segment(lines, node))
    missing = sorted({f"{name} (imported by {module})" for name, module in needed if name not in defined})
    if missing:
        raise ValueError(f"vae.standalone: the bundle does not define {', '.join(missing)}; add its module to MODULES")
    if CLASS_NAME not in defined:
        raise ValueError(f"vae.standalone: the bundle does not define {CLASS_NAME}")
    preamble = (f'"""{CLASS_NAME}: the SSVAE video autoencoder as a diffusers model, generated by vae.standalone from '
                f'the ssvae-stack modules\n{", ".join(MODULES)}, so that this folder loads where only torch, diffusers '
                f'and transformers are installed. Do not edit: regenerate.\n"""\n')
    text = preamble + "from __future__ import annotations\n\n" + "\n".join(header) + "\n" + "\n".join(body)
    compile(text, f"{MODULE_NAME}.py", "exec")  # a syntax error here is ours, not the user's
    return text


def write_standalone_module(folder: str | Path) -> Path:
    """Write ``<folder>/autoencoder_kl_ssvae.py`` (the model's code beside its weights); returns its path."""
    path = Path(folder) / f"{MODULE_NAME}.py"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(standalone_source())
    return path


def make_self_contained(folder: str | Path) -> Path:
    """Give a saved ``AutoencoderKLSSVAE`` folder its own code: ``autoencoder_kl_ssvae.py`` beside the weights and an
    ``auto_map`` in ``config.json``, so that ``diffusers.AutoModel.from_pretrained(folder, trust_remote_code=True)``
    loads it where our packages are not installed (and a pipeline's ``model_index.json`` can name it)."""
    folder = Path(folder)
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    if config.get("_class_name") != CLASS_NAME:
        raise ValueError(f"{folder} is not an {CLASS_NAME} folder (config _class_name {config.get('_class_name')!r})")
    write_standalone_module(folder)
    config["auto_map"] = {"AutoModel": f"{MODULE_NAME}.{CLASS_NAME}"}
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return folder
