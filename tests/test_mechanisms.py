"""The paper's other contrastive mechanisms and MoCHi against independent computations on tiny
batches: end-to-end and memory-bank logits and losses against the written-out InfoNCE, the
memory-bank update, end-to-end's gradient through the keys, MoCHi's mixtures (unit norm, convex
mixtures of top-N pairs in the stated ranges, no gradient, exactly s + s', never enqueued) and
MoCHi with s = s' = 0 against MoCo v2 bit for bit; then each mechanism pretrained, resumed,
converted and fine-tuned once at smoke scale."""
import copy
import hashlib
import json
import math
import os
import pickle

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from convert import safe_load
from convert.errors import UserError
from pretrain import main_moco
from pretrain.builder import MoCo, shuffled_feed
from pretrain.end_to_end import EndToEnd
from pretrain.memory_bank import MemoryBank
from pretrain.mochi import MoCHi, MochiSetting, hard_negative_mixtures, parse_setting
from tests.test_faults import images  # noqa: F401  (24 random 40 px images, a fixture)
from tests.test_moco import run_pretrain

T = 0.2


def random_batch(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g)


def unit_rows(x):
    return x / x.norm(dim=1, keepdim=True)


def infonce(logits, positives):
    """-mean_i log(exp(l_i,p(i)) / sum_j exp(l_ij)), term by term in float64."""
    total = 0.0
    for row, p in zip(logits.tolist(), positives):
        total += -math.log(math.exp(row[p]) / sum(math.exp(v) for v in row))
    return total / len(positives)


# ---------------------------------------------------------------- end-to-end
def test_end_to_end_logits_loss_and_gradient_through_the_keys():
    torch.manual_seed(0)
    model = EndToEnd(torchvision.models.resnet18, dim=8, T=T)
    ref = copy.deepcopy(model.encoder_q).double()
    im_q, im_k = random_batch(6, 1), random_batch(6, 2).requires_grad_(True)
    logits, labels = model(im_q, im_k, generator=torch.Generator().manual_seed(3))
    loss = F.cross_entropy(logits, labels)
    loss.backward()

    # independent: the same encoder in float64 (one BN group: the key order does not matter)
    q = unit_rows(ref(im_q.double()))
    k = unit_rows(ref(im_k.detach().double()))
    expected = (q @ k.T / T).detach()
    assert labels.tolist() == list(range(6))  # the dictionary is the batch: own key = column i
    np.testing.assert_allclose(logits.detach().numpy(), expected.numpy(), atol=1e-4)
    assert loss.item() == pytest.approx(infonce(expected, range(6)), abs=1e-4)

    # the gradient reaches the key path: the encoder's gradient is that of the loss through
    # queries and keys, and differs from the one with the keys detached
    def ref_grads(detach_keys):
        ref.zero_grad()
        kk = k.detach() if detach_keys else unit_rows(ref(im_k.detach().double()))
        qq = unit_rows(ref(im_q.double()))
        s = qq @ kk.T / T
        (-(s.diagonal() - torch.logsumexp(s, dim=1))).mean().backward()
        return [p.grad.clone() for p in ref.parameters()]

    both, queries_only = ref_grads(False), ref_grads(True)
    got = [p.grad for p in model.encoder_q.parameters()]
    scale = max(g.abs().max().item() for g in both)
    for g, e in zip(got, both):
        torch.testing.assert_close(g.double(), e, atol=1e-4 * scale, rtol=1e-3)
    gap = max((a - b).abs().max().item() for a, b in zip(both, queries_only))
    assert gap > 100 * 1e-4 * scale
    assert im_k.grad is not None and im_k.grad.abs().sum() > 0


def test_end_to_end_keys_use_shuffle_bn_groups_with_gradients():
    torch.manual_seed(0)
    model = EndToEnd(torchvision.models.resnet18, dim=8, T=T, num_splits=2)
    x = random_batch(8, 4)
    k = model.compute_keys(x, torch.Generator().manual_seed(4))
    assert k.requires_grad
    feed = shuffled_feed(8, 2, torch.Generator().manual_seed(4))
    assert feed.tolist() != list(range(8))
    ref = copy.deepcopy(model.encoder_q)
    expected = F.normalize(ref(x[feed]), dim=1)[torch.argsort(feed)]
    torch.testing.assert_close(k, expected, atol=1e-5, rtol=1e-5)
    assert (k - F.normalize(ref(x), dim=1)).abs().max() > 1e-3  # the grouping matters


# ---------------------------------------------------------------- memory bank
def test_memory_bank_logits_loss_negatives_and_update():
    torch.manual_seed(0)
    n, K = 10, 6
    model = MemoryBank(torchvision.models.resnet18, n, dim=8, K=K, T=T, m=0.5)
    ref = copy.deepcopy(model.encoder_q).double()
    bank = model.memory_bank.clone()
    assert torch.allclose(bank.norm(dim=1), torch.ones(n))
    index = torch.tensor([3, 7, 0, 9])
    im_q = random_batch(4, 5)
    logits, labels = model(im_q, None, index=index, draws=torch.Generator().manual_seed(6))
    loss = F.cross_entropy(logits, labels)

    # the negatives: K per query, uniform over the other n - 1 entries (the same draws)
    offsets = torch.randint(n - 1, (4, K), generator=torch.Generator().manual_seed(6))
    negatives = (index[:, None] + 1 + offsets) % n
    assert (negatives != index[:, None]).all() and negatives.max() < n
    q = unit_rows(ref(im_q.double())).detach()
    b = bank.double()
    expected = torch.cat([(q * b[index]).sum(1, keepdim=True),
                          torch.stack([b[negatives[i]] @ q[i] for i in range(4)])], 1) / T
    assert labels.tolist() == [0] * 4 and logits.shape == (4, 1 + K)
    np.testing.assert_allclose(logits.detach().numpy(), expected.numpy(), atol=1e-4)
    assert loss.item() == pytest.approx(infonce(expected, [0] * 4), abs=1e-4)

    # the update, once the step is done: the batch's entries w <- normalise(0.5 w + 0.5 q);
    # the others untouched
    assert torch.equal(model.memory_bank, bank)
    loss.backward()  # reads the bank the logits were computed with
    model.after_step()
    after = model.memory_bank
    moved = unit_rows(0.5 * b[index] + 0.5 * q)
    np.testing.assert_allclose(after[index].numpy(), moved.numpy(), atol=1e-5)
    others = torch.tensor([i for i in range(n) if i not in index.tolist()])
    assert torch.equal(after[others], bank[others])
    # no key encoder, nothing else in the model's state
    assert {k.split(".")[0] for k in model.state_dict()} == {"encoder_q", "memory_bank"}


# ---------------------------------------------------------------- MoCHi
def test_mochi_mixtures_are_unit_convex_top_n_detached_and_exactly_s_plus_s_prime():
    g = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(4, 8, generator=g), dim=1).requires_grad_(True)
    queue = F.normalize(torch.randn(8, 32, generator=g), dim=0)
    l_neg = q @ queue
    setting = MochiSetting(5, 7, 3)
    mix = hard_negative_mixtures(q, queue, l_neg, setting, torch.Generator().manual_seed(1))
    assert mix.points.shape == (4, 7 + 3, 8)
    assert not mix.points.requires_grad and mix.points.grad_fn is None
    np.testing.assert_allclose(mix.points.norm(dim=2).numpy(), 1.0, atol=1e-6)

    sims = q.detach().double().numpy() @ queue.double().numpy()
    keys = queue.t().double()
    for i in range(4):
        top = set(np.argsort(-sims[i])[:5].tolist())  # the 5 hardest, computed independently
        for p in range(7):  # pairs: two distinct top-N keys, alpha in (0, 1)
            a, b, w = int(mix.first[i, p]), int(mix.second[i, p]), float(mix.weight[i, p])
            assert a in top and b in top and a != b and 0.0 < w < 1.0
            h = w * keys[a] + (1 - w) * keys[b]
            np.testing.assert_allclose(mix.points[i, p].numpy(), (h / h.norm()).numpy(),
                                       atol=1e-6)
        for p in range(7, 10):  # query mixtures: a top-N key, beta in (0, 0.5)
            b, w = int(mix.second[i, p]), float(mix.weight[i, p])
            assert int(mix.first[i, p]) == -1 and b in top and 0.0 < w < 0.5
            h = w * q[i].detach().double() + (1 - w) * keys[b]
            np.testing.assert_allclose(mix.points[i, p].numpy(), (h / h.norm()).numpy(),
                                       atol=1e-6)
    # the draws spread over the top N and over the ranges (not one fixed choice)
    assert len(set(mix.first[:, :7].flatten().tolist())) > 3
    assert float(mix.weight[:, :7].std()) > 0.1


def twins(setting, warmup=0):
    torch.manual_seed(0)
    moco = MoCo(torchvision.models.resnet18, dim=8, K=16, m=0.9, T=T, mlp=True, num_splits=2)
    torch.manual_seed(0)
    mochi = MoCHi(torchvision.models.resnet18, dim=8, K=16, m=0.9, T=T, mlp=True, num_splits=2,
                  setting=setting, warmup_epochs=warmup)
    return moco, mochi


def steps(model, n=2):
    opt = torch.optim.SGD(model.parameters(), 0.1, momentum=0.9, weight_decay=1e-4)
    gen, draws = torch.Generator().manual_seed(7), torch.Generator().manual_seed(8)
    out = []
    for i in range(n):
        loss, logits, _ = main_moco.train_step(model, nn.CrossEntropyLoss(), opt, None,
                                               random_batch(8, 10 + i), random_batch(8, 20 + i),
                                               torch.device("cpu"), None, False, gen,
                                               torch.arange(8), draws)
        out.append((loss.detach(), logits.detach()))
    return out


def test_mochi_with_no_mixtures_is_moco_v2_bit_for_bit():
    moco, mochi = twins(MochiSetting(4, 0, 0))
    assert mochi.mixing  # warm-up over: only s = s' = 0 keeps it from mixing
    for (l1, g1), (l2, g2) in zip(steps(moco), steps(mochi)):
        assert torch.equal(l1, l2) and torch.equal(g1, g2)
    s1, s2 = moco.state_dict(), mochi.state_dict()
    assert s1.keys() == s2.keys()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)


def test_mochi_appends_its_negatives_after_warmup_and_never_enqueues_them(monkeypatch):
    from pretrain import mochi as mochi_module

    setting = MochiSetting(4, 3, 2)
    moco, mochi = twins(setting, warmup=1)
    mochi.set_epoch(0)  # warm-up: plain MoCo
    (l_moco, g_moco), = steps(moco, 1)
    (l_warm, g_warm), = steps(copy.deepcopy(mochi), 1)
    assert torch.equal(l_moco, l_warm) and g_warm.shape == (8, 1 + 16)
    mochi.set_epoch(1)
    seen = []  # each call's query, queue and draws, kept to recompute the logits

    def recorded(q, queue, l_neg, setting, draws=None):
        mix = hard_negative_mixtures(q, queue, l_neg, setting, draws)
        seen.append((q.detach().double(), queue.detach().double().clone(), mix))
        return mix
    monkeypatch.setattr(mochi_module, "hard_negative_mixtures", recorded)
    (_, g_mix), = steps(mochi, 1)
    assert g_mix.shape == (8, 1 + 16 + 3 + 2)  # exactly s + s' more per query
    assert torch.equal(g_mix[:, :17], g_moco)  # positive and queue logits unchanged
    # the appended logits by value: q . h / T, h rebuilt from the draws in float64
    (q, queue, mix), = seen
    keys = queue.t()
    first, second, w = mix.first, mix.second, mix.weight.double()[..., None]
    pairs = w[:, :3] * keys[first[:, :3]] + (1 - w[:, :3]) * keys[second[:, :3]]
    with_query = w[:, 3:] * q[:, None, :] + (1 - w[:, 3:]) * keys[second[:, 3:]]
    h = F.normalize(torch.cat([pairs, with_query], dim=1), dim=2)
    expected = torch.einsum("nc,nsc->ns", q, h) / T
    np.testing.assert_allclose(g_mix[:, 17:].double().numpy(), expected.numpy(), atol=1e-5)
    assert (expected - expected.mean()).abs().max() > 0.1  # not a constant the check passes on
    assert torch.equal(mochi.queue, moco.queue)  # the queue holds the keys only
    with pytest.raises(ValueError, match="exceeds the queue size"):
        MoCHi(torchvision.models.resnet18, dim=8, K=4, setting=MochiSetting(8, 1, 1))


def test_mochi_setting_and_mechanism_flags_fail_in_one_line():
    assert parse_setting("256,512,0") == (256, 512, 0)
    assert parse_setting("256,512,0").name() == "mochi_256_512_0"
    for bad, msg in (("256,512", "three integers"), ("1,4,0", "N must be >= 2"),
                     ("64,8,8", "lower N or raise --moco-k")):
        with pytest.raises(ValueError, match=msg):
            parse_setting(bad, queue_size=16)
    for argv in (["--mochi", "4,2,2", "--version", "v1"],
                 ["--mochi", "4,2,2", "--mechanism", "memory_bank"]):
        args = main_moco.get_args_parser().parse_args(["--data", "x", *argv])
        with pytest.raises(UserError, match="MoCo v2"):
            main_moco.resolve_args(args)
    text = " ".join(main_moco.get_args_parser().format_help().split())  # wrapped lines joined
    for needed in ("end_to_end", "memory_bank", "Kalantidis", "Wu et al.", "Figure 2a",
                   "not printed in the seeds", "printed nowhere", "not sharded"):
        assert needed.lower() in text.lower(), needed


# ---------------------------------------------------------------- pretrain, convert, transfer
MECHANISMS = {"end_to_end": dict(mechanism="end_to_end"),
              "memory_bank": dict(mechanism="memory_bank"),
              "mochi_4_3_2": dict(mochi="4,3,2", mochi_warmup_epochs=1)}
PRETRAIN = dict(max_iters=4, epochs=2)  # 3 iterations an epoch: MoCHi mixes in the second
# a smoke transfer at the size of tests/test_faults.py's, two iterations, evaluated
TRANSFER = ["SOLVER.MAX_ITER", "2", "SOLVER.IMS_PER_BATCH", "2", "INPUT.MIN_SIZE_TRAIN",
            "(56, 64)", "INPUT.MAX_SIZE_TRAIN", "128", "INPUT.MIN_SIZE_TEST", "64",
            "INPUT.MAX_SIZE_TEST", "128", "TEST.PRECISE_BN.ENABLED", "False"]


@pytest.fixture(scope="module")
def converted(images, tmp_path_factory):
    """{name: (checkpoint, converted .pkl)}: each mechanism pretrained 4 iterations and put
    through convert/to_detectron2.py."""
    from convert.to_detectron2 import main as convert_main

    root = tmp_path_factory.mktemp("mechanism-runs")
    out = {}
    for name, opts in MECHANISMS.items():
        ckpt = run_pretrain(images, root / name, **PRETRAIN, **opts)
        pkl = str(root / f"{name}.pkl")
        assert convert_main([ckpt, pkl]) == 0
        out[name] = ckpt, pkl
    return out


_TAGGED_AS_CUDA = []  # while not empty, torch.save tags every storage cuda:0
torch.serialization.register_package(
    0, lambda storage: "cuda:0" if _TAGGED_AS_CUDA else None, lambda storage, location: None)


def as_written_on_a_gpu(path):
    """Rewrite a CPU run's checkpoint as a CUDA run writes it: the GPU generator's state (16
    bytes of Philox seed and offset, not the CPU's 5056 of Mersenne twister) for the global
    RNG and, as checkpoints before the draws were reseeded every iteration held it, for the
    draws' generator; every tensor's storage tagged cuda:0, so that only a load mapped to the
    CPU reads it here."""
    ck = torch.load(path, map_location="cpu", weights_only=True)  # this test's own file
    philox = torch.arange(16, dtype=torch.uint8)
    ck["rng"]["cuda"], ck["draw_generator"] = philox.clone(), philox.clone()
    _TAGGED_AS_CUDA.append(True)
    try:
        torch.save(ck, path)
    finally:
        _TAGGED_AS_CUDA.clear()
    with pytest.raises(RuntimeError, match="CUDA"):
        torch.load(path, weights_only=True)  # as on any machine without a GPU


@pytest.mark.parametrize("name", list(MECHANISMS))
def test_mechanism_checkpoint_resumes_exactly(name, converted, images, tmp_path):
    """Killed after 2 iterations and started again, from the checkpoint as a GPU run writes it
    (as_written_on_a_gpu): the checkpoint after 4 equals the uninterrupted CPU run's bit for bit
    (the memory bank, the queue, the shuffle's generator are in the checkpoint; the draws are
    reseeded every iteration); a run directory of another mechanism is refused in one line."""
    opts = MECHANISMS[name]
    first = run_pretrain(images, tmp_path, **dict(PRETRAIN, max_iters=2), save_every_iters=1,
                         **opts)
    as_written_on_a_gpu(first)
    resumed = run_pretrain(images, tmp_path, **PRETRAIN, **opts)
    ck, ck2 = safe_load.load_torch(converted[name][0]), safe_load.load_torch(resumed)
    assert ck2["iteration"] == 4 and ck["mechanism"] == opts.get("mechanism", "moco")
    assert ck.keys() == ck2.keys() and ck["state_dict"].keys() == ck2["state_dict"].keys()
    for k, v in ck["state_dict"].items():
        assert torch.equal(ck2["state_dict"][k], v), k
    assert any(k.startswith("module.encoder_q.") for k in ck["state_dict"])
    if name == "memory_bank":
        assert ck["state_dict"]["module.memory_bank"].shape == (24, 128)  # one per image
    with pytest.raises(UserError, match="trained with --mechanism"):
        run_pretrain(images, tmp_path, max_iters=5,
                     mechanism="end_to_end" if name == "memory_bank" else "memory_bank")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (make gpu-check)")
def test_a_checkpoint_moves_between_cpu_and_gpu_runs(images, tmp_path):
    """The reverse of as_written_on_a_gpu, where a GPU exists: 2 iterations on the CPU, the 3rd
    resumed on the GPU, the 4th on the CPU again; every generator state in the checkpoints is a
    CPU ByteTensor (the GPU's own in 'rng'), and the run ends where the CPU run does."""
    opts = dict(PRETRAIN, **MECHANISMS["memory_bank"])
    run_pretrain(images, tmp_path, **dict(opts, max_iters=2), save_every_iters=1, device="cpu")
    on_gpu = safe_load.load_torch(run_pretrain(images, tmp_path, **dict(opts, max_iters=3),
                                               device="cuda"))
    assert on_gpu["iteration"] == 3 and "draw_generator" not in on_gpu
    assert on_gpu["rng"]["cuda"].device.type == "cpu" and on_gpu["rng"]["cuda"].dtype == \
        torch.uint8
    back = safe_load.load_torch(run_pretrain(images, tmp_path, **opts, device="cpu"))
    assert back["iteration"] == 4 and back["rng"]["cuda"] is None
    assert all(torch.isfinite(v).all() for v in back["state_dict"].values()
               if v.is_floating_point())


def test_every_mechanism_converts_and_transfers(converted, tmp_path, monkeypatch):
    """Each converted checkpoint is read as MoCo's query encoder and fine-tunes one smoke run
    of the demo task (make suite, two runs at a time), recorded with its source's sha256."""
    from pretrain import synthetic
    from tools.suite import main as suite_main

    synthetic.generate(str(tmp_path / "datasets" / "synthetic"), n_unlabeled=0,
                       n_labeled_per_class=0, n_train=4, n_val=2, quiet=True)
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path / "datasets"))
    for name, (_, pkl) in converted.items():
        with open(pkl, "rb") as f:
            meta = pickle.load(f)["moco_transfer"]
        assert meta["format"] == "moco" and meta["arch"] == "resnet18"
    weights = " ".join(f"{name}={pkl}" for name, (_, pkl) in converted.items())
    assert suite_main(["--tasks", "synthetic_frcnn_fpn_1k", "--weights", weights, "--seeds", "1",
                       "--scale", "smoke", "--runs", str(tmp_path / "runs"), "--jobs", "2",
                       *TRANSFER]) == 0
    for name, (ckpt, _) in converted.items():
        with open(tmp_path / "runs" / "synthetic_frcnn_fpn_1k@smoke" / name / "seed0" /
                  "results.json") as f:
            rec = json.load(f)
        assert rec["state"] == "complete" and "bbox/AP50" in rec["metrics"], name
        assert rec["weights_sha256"] == hashlib.sha256(open(ckpt, "rb").read()).hexdigest()


def test_default_run_directory_is_named_after_the_mechanism(images, tmp_path):
    args = main_moco.get_args_parser().parse_args(["--data", images, "--mochi", "4,3,2",
                                                    "--moco-k", "16"])
    assert os.path.basename(main_moco.resolve_args(args).output) == "mochi_4_3_2_v2_resnet50"


def test_memory_bank_entry_of_an_unreadable_image_is_never_written(images, tmp_path):
    """An unreadable image is replaced by the next readable one (pretrain/loader.py); the
    replacement's features go into the replacement's own entry. After the first epoch's
    updates (24 images, 3 batches of 8; an update lands at the next step), the unreadable
    image's entry is its initial value bit for bit, and every readable image's entry has moved.
    Control: with the sampler's index (the old code), the unreadable entry is overwritten."""
    import shutil

    from pretrain import loader

    data = tmp_path / "images"
    shutil.copytree(images, data)
    paths = loader.list_images(str(data))[0]
    bad = 5
    with open(paths[bad], "wb") as f:
        f.write(b"not an image")
    ck = safe_load.load_torch(run_pretrain(str(data), tmp_path / "run", max_iters=4, epochs=2,
                                           mechanism="memory_bank"))
    bank = ck["state_dict"]["module.memory_bank"]
    init = F.normalize(torch.randn(len(paths), 128, generator=torch.Generator().manual_seed(0)),
                       dim=1)
    assert torch.equal(bank[bad], init[bad])
    moved = [i for i in range(len(paths)) if not torch.equal(bank[i], init[i])]
    assert moved == [i for i in range(len(paths)) if i != bad]
