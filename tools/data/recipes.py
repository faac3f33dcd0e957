"""The recipes (tools/data/recipes.json) and the dataset root's manifest of built datasets.

A recipe override (``--recipes file.json``, same schema) replaces whole datasets by name: tests
and private mirrors give their own URLs, checksums and counts; nothing switches verification
off.
"""
import datetime
import hashlib
import json
import os

from convert.errors import UserError
from convert.fetch import Remote
from convert.files import write_json_atomic

RECIPES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "recipes.json")
MANIFEST = "datasets-manifest.json"
REMOTE_KEYS = ("filename", "urls", "md5", "sha256", "size", "checksum_source")


def _read_json(path, what):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {what} {path}: {e}") from None


def load_recipes(override=None):
    """{"datasets": {name: recipe}, "groups": {name: [dataset, ...]}}, the override's datasets
    and groups replacing the defaults of the same name."""
    recipes = _read_json(RECIPES, "the recipes")
    if override:
        extra = _read_json(override, "the recipe override")
        if not isinstance(extra, dict) or not isinstance(extra.get("datasets", {}), dict):
            raise UserError(f"{override}: a recipe override holds {{\"datasets\": {{name: "
                            "recipe}}}} like tools/data/recipes.json")
        recipes["datasets"].update(extra.get("datasets", {}))
        recipes["groups"].update(extra.get("groups", {}))
    return recipes


def resolve(recipes, name):
    """The datasets that ``name`` (a dataset or a group) stands for, dependencies first."""
    datasets, groups = recipes["datasets"], recipes["groups"]
    if name not in datasets and name not in groups:
        raise UserError(f"unknown dataset '{name}': choose one of "
                        f"{', '.join(sorted(datasets))} or a group ({', '.join(sorted(groups))})")
    order = []

    def visit(n):
        for dep in datasets[n].get("needs", []):
            visit(dep)
        if n not in order:
            order.append(n)

    for n in (groups[name] if name in groups else [name]):
        visit(n)
    return order


def remote(file_recipe):
    return Remote(**{k: file_recipe[k] for k in REMOTE_KEYS if k in file_recipe})


def fingerprint(recipe):
    """What a built dataset was built from (files, checksums, layout, counts)."""
    keep = {k: recipe.get(k) for k in ("files", "moves", "convert", "counts")}
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------- the root's manifest
def read_manifest(root):
    path = os.path.join(root, MANIFEST)
    if not os.path.exists(path):
        return {}
    data = _read_json(path, "the datasets manifest")
    if not isinstance(data, dict):
        raise UserError(f"{path} is not a datasets manifest: remove it and run `make data` again")
    return data


def record(root, name, entry):
    data = read_manifest(root)
    entry = dict(entry, built=datetime.datetime.now(datetime.timezone.utc)
                 .isoformat(timespec="seconds"))
    data[name] = entry
    write_json_atomic(data, os.path.join(root, MANIFEST), indent=1, sort_keys=True)


def forget(root, name):
    data = read_manifest(root)
    if data.pop(name, None) is not None:
        write_json_atomic(data, os.path.join(root, MANIFEST), indent=1, sort_keys=True)


def missing_for(dataset_names, recipes, built):
    """(the recipes to build for the detectron2 datasets named: those providing them whose
    build, or a dependency's, is not recorded; names no recipe provides). `make data` of a
    recipe builds its dependencies first, so only the providers are named."""
    providers = {d: name for name, r in recipes["datasets"].items()
                 for d in r.get("provides", [])}
    unknown = [d for d in dataset_names if d not in providers]
    wanted = []
    for d in dataset_names:
        name = providers.get(d)
        if name and name not in wanted and any(n not in built for n in resolve(recipes, name)):
            wanted.append(name)
    return wanted, unknown


def make_data_command(names, root):
    return " && ".join(f"make data DATASET={n} ROOT={root}" for n in names)
