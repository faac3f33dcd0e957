"""MoCo core: InfoNCE against a written-out formula, queue, momentum, shuffle BN, resume."""
import copy
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torchvision
from PIL import Image

from convert import safe_load
from pretrain import main_moco
from pretrain.builder import MoCo, SplitBatchNorm, batch_shuffle_ddp, batch_unshuffle_ddp


def small_moco(K=16, num_splits=1, mlp=False, T=0.2, dim=8):
    torch.manual_seed(0)
    return MoCo(torchvision.models.resnet18, dim=dim, K=K, m=0.9, T=T, mlp=mlp,
                num_splits=num_splits)


def test_logits_and_loss_match_written_out_infonce():
    model = small_moco(K=16)
    ref = copy.deepcopy(model)
    torch.manual_seed(1)
    im_q, im_k = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    queue_before = model.queue.clone()
    logits, labels = model(im_q, im_k)
    loss = nn.functional.cross_entropy(logits, labels)

    # independent computation: momentum step, then features, then the InfoNCE sum in float64
    with torch.no_grad():
        for pq, pk in zip(ref.encoder_q.parameters(), ref.encoder_k.parameters()):
            pk.copy_(0.9 * pk + 0.1 * pq)
        q = ref.encoder_q(im_q).double()
        k = ref.encoder_k(im_k).double()  # one BN group: the batch order does not matter
    q = q / q.norm(dim=1, keepdim=True)
    k = k / k.norm(dim=1, keepdim=True)
    queue = queue_before.double()
    expected_loss = 0.0
    for i in range(4):
        pos = math.exp(float(q[i] @ k[i]) / 0.2)
        negs = [math.exp(float(q[i] @ queue[:, j]) / 0.2) for j in range(16)]
        assert logits[i, 0].item() == pytest.approx(float(q[i] @ k[i]) / 0.2, abs=1e-4)
        np.testing.assert_allclose(logits[i, 1:].detach().numpy(),
                                   (q[i] @ queue / 0.2).numpy(), atol=1e-4)
        expected_loss += -math.log(pos / (pos + sum(negs))) / 4
    assert labels.tolist() == [0, 0, 0, 0]
    assert loss.item() == pytest.approx(expected_loss, abs=1e-4)


def test_queue_order_and_pointer_wrap():
    model = small_moco(K=12, dim=3)
    batches = [torch.full((4, 3), float(b)) for b in range(4)]
    for b in batches[:3]:
        model._dequeue_and_enqueue(b)
    assert int(model.queue_ptr) == 0  # 3 batches of 4 filled K=12 and wrapped
    assert model.queue[0].tolist() == [0.0] * 4 + [1.0] * 4 + [2.0] * 4
    model._dequeue_and_enqueue(batches[3])  # the oldest keys are replaced first
    assert model.queue[0].tolist() == [3.0] * 4 + [1.0] * 4 + [2.0] * 4
    assert int(model.queue_ptr) == 4
    with pytest.raises(ValueError, match="multiple of the batch"):
        model._dequeue_and_enqueue(torch.zeros(5, 3))


def test_momentum_update_is_exact():
    model = small_moco()
    with torch.no_grad():
        for p in model.encoder_q.parameters():
            p.add_(torch.randn_like(p))
    q = [p.clone() for p in model.encoder_q.parameters()]
    k = [p.clone() for p in model.encoder_k.parameters()]
    model._momentum_update_key_encoder()
    for pq, pk, new in zip(q, k, model.encoder_k.parameters()):
        torch.testing.assert_close(new, 0.9 * pk + 0.1 * pq, rtol=0, atol=1e-6)
    assert all(not p.requires_grad for p in model.encoder_k.parameters())


class RecordingEncoder(nn.Module):
    """Identity features that remember the batch they were given, in the order given."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x):
        self.seen.append(x.clone())
        return x.flatten(1)


def test_single_process_shuffle_feeds_the_key_encoder_a_permuted_batch_and_undoes_it():
    model = small_moco(num_splits=1)
    model.encoder_k = RecordingEncoder()
    x = torch.arange(8, dtype=torch.float32).view(8, 1, 1, 1) + 1.0
    k = model.compute_keys(x, generator=torch.Generator().manual_seed(3))
    # the exact order the key encoder received: the generator's permutation of the batch
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(3))
    assert perm.tolist() != list(range(8))
    assert len(model.encoder_k.seen) == 1
    assert model.encoder_k.seen[0].flatten().tolist() == (perm + 1).tolist()
    # keys come back in the input order
    torch.testing.assert_close(k, nn.functional.normalize(x.flatten(1), dim=1))


def test_key_shuffle_changes_the_keys_under_split_batchnorm():
    """With BN statistics per group, which samples share a group decides the keys: the keys of
    the shuffled batch (unshuffled) differ from the keys of the batch in its own order, and
    equal the per-group BN computation on the permuted batch."""
    model = small_moco(num_splits=2)
    torch.manual_seed(2)
    x = torch.randn(8, 3, 32, 32)
    k = model.compute_keys(x, generator=torch.Generator().manual_seed(4))
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(4)).tolist()
    # 2 processes of 4: rank r holds positions r, r + 2, ...; all_gather lists rank 0's then
    # rank 1's; after the shuffle rank r encodes gathered entries perm[4r:4r + 4], which the
    # single process must put in group r (positions r, r + 2, ...)
    gathered = [0, 2, 4, 6, 1, 3, 5, 7]
    feed = [None] * 8
    for r in range(2):
        for i in range(4):
            feed[i * 2 + r] = gathered[perm[4 * r + i]]
    assert sorted(feed) == list(range(8)) and feed != perm
    feed = torch.tensor(feed)
    ref = small_moco(num_splits=2).encoder_k  # the same initial weights
    unshuffled = nn.functional.normalize(ref(x), dim=1)
    expected = nn.functional.normalize(ref(x[feed]), dim=1)[torch.argsort(feed)]
    torch.testing.assert_close(k, expected, atol=1e-5, rtol=1e-5)
    assert (k - unshuffled).abs().max() > 1e-3


@pytest.mark.parametrize("channels_last", [False, True])
def test_split_batchnorm_equals_per_group_batchnorm(channels_last):
    torch.manual_seed(0)
    x = torch.randn(8, 3, 4, 4)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    groups = [torch.arange(g, 8, 4) for g in range(4)]  # samples n with n % 4 == g, either way
    split = SplitBatchNorm(3, num_splits=4)
    out = split(x)
    assert out.is_contiguous(memory_format=torch.channels_last) == channels_last
    for idx in groups:
        torch.testing.assert_close(out[idx], nn.BatchNorm2d(3)(x[idx]), atol=1e-5, rtol=1e-5)
    expected_mean = 0.1 * torch.stack([x[idx].mean(dim=(0, 2, 3)) for idx in groups]).mean(0)
    torch.testing.assert_close(split.running_mean, expected_mean, atol=1e-6, rtol=1e-5)


def _ddp_roundtrip(rank, world, port, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    x = torch.arange(4, dtype=torch.float32).view(4, 1) + 10 * rank
    shard, undo = batch_shuffle_ddp(x, torch.Generator().manual_seed(5))
    back = batch_unshuffle_ddp(shard, undo)
    results[rank] = (x.tolist(), back.tolist(), shard.tolist())
    dist.destroy_process_group()


def test_ddp_shuffle_roundtrip_two_processes():
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    results = mp.Manager().dict()
    mp.spawn(_ddp_roundtrip, args=(2, port, results), nprocs=2, join=True)
    shards = []
    for rank in range(2):
        x, back, shard = results[rank]
        assert back == x
        shards += shard
    # the exact shards: the global batch [0..3, 10..13] permuted by the generator, cut in two
    glob = [0.0, 1.0, 2.0, 3.0, 10.0, 11.0, 12.0, 13.0]
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(5)).tolist()
    assert perm != list(range(8))
    assert shards == [[glob[i]] for i in perm]


# ---------------------------------------------------------------- training runs
@pytest.fixture(scope="module")
def tiny_images(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for i in range(24):
        arr = (rng.random((40, 40, 3)) * 255).astype(np.uint8)
        mode = "L" if i == 3 else ("CMYK" if i == 4 else "RGB")
        Image.fromarray(arr).convert(mode).save(root / f"{i:03d}.{'jpg' if mode != 'CMYK' else 'tif'}")
    (root / "broken.jpg").write_bytes(b"not an image")
    return str(root)


def run_pretrain(data, out, **kw):
    args = main_moco.get_args_parser().parse_args([])
    opts = dict(data=data, output=str(out), arch="resnet18", epochs=3, batch_size=8, moco_k=16,
                image_size=32, shuffle_groups=2, workers=0, precision="fp32", print_freq=1)
    opts.update(kw)
    for k, v in opts.items():
        setattr(args, k, v)
    return main_moco.main(args)


def test_checkpoint_format_and_resume_after_kill_is_exact(tiny_images, tmp_path):
    full = run_pretrain(tiny_images, tmp_path / "full", max_iters=6)
    ck = safe_load.load_torch(full)
    assert {"epoch", "arch", "state_dict", "optimizer"} <= set(ck)
    assert ck["arch"] == "resnet18" and ck["epoch"] == 2  # 3 iterations per epoch
    sd = ck["state_dict"]
    assert {"module.queue", "module.queue_ptr"} <= set(sd)
    ref = torchvision.models.resnet18(num_classes=128)
    ref.fc = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), ref.fc)  # v2 MLP head
    for enc in ("encoder_q", "encoder_k"):
        for k, v in ref.state_dict().items():
            assert sd[f"module.{enc}.{k}"].shape == v.shape
    assert sd["module.queue"].shape == (128, 16)
    assert os.path.exists(tmp_path / "full" / "metrics.json")

    # killed after 4 iterations (mid-epoch 2), then started again: the same final weights
    run_pretrain(tiny_images, tmp_path / "cut", max_iters=4, save_every_iters=1)
    resumed = run_pretrain(tiny_images, tmp_path / "cut", max_iters=6)
    ck2 = safe_load.load_torch(resumed)
    assert ck2["iteration"] == 6
    for k, v in sd.items():
        torch.testing.assert_close(ck2["state_dict"][k], v, rtol=0, atol=0, msg=k)
    # ... and the second start ran only the missing iterations 5 and 6, with the losses the
    # uninterrupted run had at those iterations (metrics.json is appended, one line per step)
    full_log, cut_log = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "cut")
    assert [r["iteration"] for r in full_log] == [1, 2, 3, 4, 5, 6]
    assert [r["iteration"] for r in cut_log] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in cut_log] == [r["loss"] for r in full_log]
    log = (tmp_path / "cut" / "log.txt").read_text()
    assert log.count("resumed from") == 1
    assert "checkpoint_last.pth.tar at iteration 4 (epoch 1)" in log


def read_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.json")) as f:
        return [json.loads(line) for line in f]


def test_unreadable_and_non_rgb_images_are_handled(tiny_images, caplog):
    from pretrain import loader

    ds = loader.ImageFiles(tiny_images, loader.moco_augmentation("v1", 32), seed=0)
    with caplog.at_level("WARNING"):
        items = [ds[i] for i in range(len(ds))]
    assert all(x.shape == (3, 32, 32) for x, _ in items)
    assert any("broken.jpg" in r.message for r in caplog.records)


def test_slurm_submission_dry_run(capsys):
    from pretrain import submit

    assert submit.main(submit.get_args_parser().parse_args(
        ["--data", "/data/imagenet/train", "--nodes", "2", "--gpus-per-node", "8",
         "--partition", "p1", "--dry-run"])) == 0
    out = capsys.readouterr().out
    assert "16 processes, global batch 256, lr 0.03" in out
    assert "'slurm_partition': 'p1'" in out and "'tasks_per_node': 8" in out


def test_linear_eval_trains_only_fc_and_supervised_baseline_converts(tiny_images, tmp_path):
    import shutil

    from convert.to_detectron2 import convert
    from pretrain import main_lincls, main_supervised

    labeled = tmp_path / "labeled"
    for i, name in enumerate(sorted(os.listdir(tiny_images))):
        if name.startswith("0"):
            (labeled / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
            shutil.copy(os.path.join(tiny_images, name), labeled / f"c{i % 2}" / name)
    ck = run_pretrain(tiny_images, tmp_path / "pt", max_iters=3)
    args = main_lincls.get_args_parser().parse_args(
        ["--data", str(labeled), "--pretrained", ck, "--output", str(tmp_path / "lin"),
         "--epochs", "2", "--batch-size", "8", "--image-size", "32", "--workers", "0",
         "--precision", "fp32"])
    top1 = main_lincls.main(args)
    assert 0.0 <= top1 <= 100.0
    lin = safe_load.load_torch(tmp_path / "lin" / "checkpoint_last.pth.tar")
    pre = safe_load.load_torch(ck)["state_dict"]
    for k, v in lin["state_dict"].items():  # frozen: everything but fc, BN statistics included
        if not k.startswith("module.fc."):
            torch.testing.assert_close(v, pre["module.encoder_q." + k[len("module."):]])
    assert lin["state_dict"]["module.fc.weight"].shape == (2, 512)

    sargs = main_supervised.get_args_parser().parse_args(
        ["--data", str(labeled), "--output", str(tmp_path / "sup"), "--arch", "resnet18",
         "--epochs", "1", "--batch-size", "8", "--image-size", "32", "--workers", "0",
         "--precision", "fp32"])
    sup = main_supervised.main(sargs)
    out, info = convert(sup)
    assert info["format"] == "torchvision" and info["arch"] == "resnet18"


def test_embedded_default_is_moco_v1_and_given_data_the_papers_v2(tmp_path, monkeypatch):
    """Without --data: the demo's recipe (MoCo v1: no MLP head, T 0.07, no blur, constant lr);
    with --data: the paper's v2 defaults; --mochi keeps v2 (MoCHi builds on it)."""
    monkeypatch.setattr(main_moco, "generate", lambda root: str(tmp_path))
    parse = main_moco.get_args_parser().parse_args
    embedded = main_moco.resolve_args(parse([]))
    assert (embedded.version, embedded.mlp, embedded.aug_plus, embedded.moco_t, embedded.cos,
            embedded.schedule, embedded.lr) == ("v1", False, False, 0.07, 0, [], 0.03)
    given = main_moco.resolve_args(parse(["--data", str(tmp_path)]))
    assert (given.version, given.mlp, given.moco_t, given.cos, given.arch, given.moco_k) == \
        ("v2", True, 0.2, 1, "resnet50", 65536)
    assert main_moco.resolve_args(parse(["--mochi", "32,64,32"])).version == "v2"
    assert main_moco.resolve_args(parse(["--version", "v2"])).mlp
