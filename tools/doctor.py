"""`make doctor`: what this installation has, which datasets it sees, and which tasks can run.

Exits non-zero, with one line per problem, when something required is missing (torch,
torchvision, detectron2 or the project's own modules cannot be imported).
"""
import json
import os
import sys

from convert.errors import UserError
from tools.data.recipes import (MANIFEST, load_recipes, make_data_command, missing_for,
                                read_manifest)

# (name, detectron2 datasets it comprises, how to count it)
KNOWN_DATASETS = [
    ("COCO 2017", ["coco_2017_train", "coco_2017_val"]),
    ("COCO 2017 keypoints", ["keypoints_coco_2017_train", "keypoints_coco_2017_val"]),
    ("VOC 2007", ["voc_2007_trainval", "voc_2007_test"]),
    ("VOC 2012", ["voc_2012_trainval"]),
    ("LVIS v0.5", ["lvis_v0.5_train", "lvis_v0.5_val"]),
    ("LVIS v1", ["lvis_v1_train", "lvis_v1_val"]),
    ("Cityscapes (fine)", ["cityscapes_fine_instance_seg_train", "cityscapes_fine_instance_seg_val"]),
    ("DensePose-COCO", ["densepose_coco_2014_train", "densepose_coco_2014_valminusminival",
                        "densepose_coco_2014_minival"]),
    ("synthetic (embedded)", ["synthetic_train", "synthetic_val"]),
]
BIG_JSON = 200 << 20  # don't parse annotation files larger than this just to count


def count(meta):
    """A short 'N images, M annotations' description of a registered dataset found on disk."""
    et = meta.get("evaluator_type", "")
    if et == "pascal_voc":
        with open(os.path.join(meta.dirname, "ImageSets", "Main", meta.split + ".txt")) as f:
            n = sum(1 for line in f if line.strip())
        return f"{n} images"
    if et.startswith("cityscapes"):
        n = sum(len([f for f in fs if f.endswith("_leftImg8bit.png")])
                for _, _, fs in os.walk(meta.image_dir))
        return f"{n} images"
    path = meta.json_file
    if os.path.getsize(path) > BIG_JSON:
        return f"annotations {os.path.getsize(path) >> 20} MB (not parsed)"
    with open(path) as f:
        data = json.load(f)
    return f"{len(data.get('images', []))} images, {len(data.get('annotations', []))} annotations"


def densepose_files():
    """Which optional DensePose data files (flip tables, GPS geodesics) are present."""
    # (doctor imports the harness only once main() has checked torch and detectron2 import)
    from transfer.densepose.config import UV_SYMMETRY_FILE, densepose_data_dir
    from transfer.densepose.gps import OFFICIAL_FILES
    folder = densepose_data_dir("")
    found = {f: os.path.isfile(os.path.join(folder, f))
             for f in (UV_SYMMETRY_FILE,) + OFFICIAL_FILES}
    flip = "flip on" if found[UV_SYMMETRY_FILE] else f"no {UV_SYMMETRY_FILE}: trains without flip"
    geo = ("GPS on" if all(found[f] for f in OFFICIAL_FILES) else
           "no " + ", ".join(f for f in OFFICIAL_FILES if not found[f]) + ": box/mask AP only")
    return f"{folder}: {flip}; {geo}"


def main():
    problems = []
    try:
        import torch
        import torchvision
        print(f"torch        {torch.__version__}   torchvision {torchvision.__version__}")
    except ImportError as e:
        problems.append(f"torch/torchvision cannot be imported ({e}); run `make setup`")
        torch = None
    try:
        import detectron2
        from transfer.d2 import has_compiled_ops
        compiled = has_compiled_ops()
        print(f"detectron2   {detectron2.__version__} at {os.path.dirname(detectron2.__file__)}")
        print("compiled ops " + ("present (detectron2._C)" if compiled else
              "absent: pure-Python detectron2; deformable/rotated ops unavailable, COCO "
              "evaluation through faster-coco-eval's C++ COCOeval"))
    except ImportError as e:
        problems.append(f"detectron2 cannot be imported ({e}); run `make setup`")
    if torch is not None:
        if torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                print(f"cuda:{i}       {torch.cuda.get_device_name(i)}")
        else:
            print("CUDA         no GPU visible: training runs on the CPU")
    if problems:
        print("\n".join("problem: " + p for p in problems))
        return 1

    # imported once torch and detectron2 are known to import (the checks above say why not)
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from transfer import datasets
    from transfer.config import load_task_config
    from transfer.configs import known_tasks

    print(f"dataset root {datasets.dataset_root()} "
          f"({'DETECTRON2_DATASETS' if os.getenv('DETECTRON2_DATASETS') else 'default; set DETECTRON2_DATASETS to change'})")
    for label, names in KNOWN_DATASETS:
        parts = []
        for name in names:
            if name not in DatasetCatalog.list():
                parts.append(f"{name}: not registered (needs its project module)")
                continue
            try:
                datasets.check_datasets([name])
                parts.append(f"{name}: {count(MetadataCatalog.get(name))}")
            except datasets.DatasetMissing:
                parts.append(f"{name}: not found")
            except Exception as e:
                parts.append(f"{name}: unreadable ({type(e).__name__}: {e})")
        print(f"  {label:<22} " + "; ".join(parts))
    print(f"  {'DensePose data files':<22} " + densepose_files())

    root = datasets.dataset_root()
    recipes = load_recipes()
    try:
        built = read_manifest(root)
    except UserError as e:
        print(f"problem: {e}")
        built = {}
    print(f"make data    {os.path.join(root, MANIFEST)}"
          f"{'' if built else ' (absent: no dataset built by make data)'}")
    for name in recipes["datasets"]:
        if name in built:
            counts = ", ".join(f"{k} {v}" for k, v in built[name].get("counts", {}).items())
            print(f"  {name:<12} built {built[name].get('built', '?')}: {counts}")
        else:
            print(f"  {name:<12} not built: {make_data_command([name], root)}")

    print("tasks:")
    for task in known_tasks():
        cfg = load_task_config(task)
        names = list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST)
        todo, _ = missing_for(names, recipes, built)
        try:
            datasets.check_datasets(names)
        except (datasets.DatasetMissing, KeyError) as e:
            first = str(e).splitlines()[0]
            fix = f"; run: {make_data_command(todo, root)}" if todo else ""
            print(f"  {task:<26} cannot run: {first}{fix}")
            continue
        if todo:
            print(f"  {task:<26} can run (files present, not built by make data: "
                  f"{', '.join(todo)} unverified)")
        else:
            print(f"  {task:<26} ready")
    return 0


if __name__ == "__main__":
    sys.exit(main())
