"""`make demo MECHANISMS="moco end_to_end memory_bank mochi"`: the demo's comparison with the
MoCo paper's other mechanisms and MoCHi beside MoCo, each pretrained with the demo's budget
(pretrain.main_moco.EMBEDDED_DEFAULTS: the same data, epochs, batch, lr, augmentation), then
converted and fine-tuned like MoCo, in one table with the random-init and supervised rows.

The demo's queue is K = 512 (not 65536), so MoCHi's setting is scaled to it: N = K / 16 = 32
(the ImageNet-100 settings take N = 1024 of K = 16384), s = 2N and s' = N (the ratios of
MoCHi (256, 512, 256)); mixing starts after 1 of the 12 epochs (10 of 200 in a
re-implementation: 0.6 epoch, rounded up). The memory bank draws its K = 512 negatives from the
1024 entries of the unlabelled set; end-to-end's dictionary is the batch of 64.
"""
import copy
import os

from pretrain import main_moco

# row name -> main_moco options; "moco" is the demo's own run
DEMO_MECHANISMS = {
    "moco": {},
    "end_to_end": {"mechanism": "end_to_end"},
    "memory_bank": {"mechanism": "memory_bank"},
    # MoCHi builds on MoCo v2 (its head, temperature and augmentation): the demo's v1 recipe
    # would not be MoCHi
    "mochi": {"mochi": "32,64,32", "mochi_warmup_epochs": 1, "version": "v2"},
}


def parse_mechanisms(text):
    """'moco end_to_end mochi' -> ['end_to_end', 'mochi'] (moco always runs); a one-line
    error naming the known ones otherwise."""
    names = text.split()
    unknown = [n for n in names if n not in DEMO_MECHANISMS]
    if unknown:
        raise SystemExit(f"MECHANISMS: unknown {' '.join(unknown)}; known: "
                         f"{' '.join(DEMO_MECHANISMS)}")
    return [n for n in dict.fromkeys(names) if n != "moco"]


def row_name(name):
    """The table row (weights name): MoCHi's carries its setting (mochi_32_64_32)."""
    setting = DEMO_MECHANISMS[name].get("mochi")
    return f"mochi_{setting.replace(',', '_')}" if setting else name


def pretrain_mechanisms(names, moco_args, say):
    """Pretrain each of `names` with the demo's MoCo settings (`moco_args`), beside MoCo's run
    folder; returns {row name: checkpoint}. A finished run is reused (it resumes to its end)."""
    out = {}
    for name in names:
        args = copy.copy(moco_args)
        for k, v in DEMO_MECHANISMS[name].items():
            setattr(args, k, v)
        args.output = os.path.join(os.path.dirname(moco_args.output), row_name(name))
        say(f"2/6 + {row_name(name)} pretraining, the same budget (log: {args.output}/log.txt)")
        out[row_name(name)] = main_moco.main(args)
    return out


def convert_all(checkpoints, weights_dir, convert):
    """Convert each checkpoint to <weights_dir>/<row name>.pkl with `convert(src, dst)`;
    returns the suite's weights specs ['name=path', ...]."""
    specs = []
    for name, ckpt in checkpoints.items():
        pkl = os.path.join(weights_dir, f"{name}.pkl")
        convert(ckpt, pkl)
        specs.append(f"{name}={pkl}")
    return specs
