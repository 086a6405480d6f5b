"""Train/eval loaders of both backends: interface, label order, resume, sharding, bad input, parity."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from test_data_fixtures import BAD_KINDS, READABLE_ODD_KINDS, make_sop, write_odd

from unidml.config import DataConfig
from unidml.data_pipeline import build_dataset, build_eval_loader, build_train_loader
from unidml.data_pipeline.dataset import ImageSet
from unidml.data_pipeline.transforms import IMAGENET_MEAN, IMAGENET_STD
from unidml.errors import UserError

CPU = torch.device("cpu")
BACKENDS = ["torchvision", "dali"]


@pytest.fixture(scope="module")
def sop(tmp_path_factory) -> Path:
    """6 train classes x 4 images, 3 test classes x 4, 40x40 JPEGs."""
    return make_sop(tmp_path_factory.mktemp("sop"), train_classes=6, test_classes=3, per_class=4, size=(40, 40))


@pytest.fixture(scope="module")
def bad_sop(tmp_path_factory) -> tuple[Path, set[str], set[str]]:
    """SOP tree whose train split holds every bad kind, a missing file and the readable oddities."""
    root = make_sop(tmp_path_factory.mktemp("badsop"), train_classes=4, test_classes=2, per_class=4, size=(40, 40))
    bad = {str(write_odd(root / f"class00{1 + i % 4}_final/{1 + i % 4}_{i // 4}.JPG", kind))
           for i, kind in enumerate(BAD_KINDS)}
    missing = root / "class004_final/4_3.JPG"
    missing.unlink()
    bad.add(str(missing))
    odd = {str(write_odd(root / f"class00{1 + i}_final/{1 + i}_2.JPG", kind))
           for i, kind in enumerate(READABLE_ODD_KINDS)}
    return root, bad, odd


def _cfg(root: Path, backend: str, **kw):
    base = dict(dataset="sop", root=str(root), backend=backend, image_size=16, resize_size=20, num_workers=1,
                val_classes=0.0)
    return OmegaConf.structured(DataConfig(**{**base, **kw}))


def _train(cfg, images: ImageSet, world: int = 1, rank: int = 0, batch: int = 4, run_dir=None, seed: int = 0):
    return build_train_loader(cfg, images, global_batch_size=batch, rank=rank, world_size=world, seed=seed,
                              run_dir=run_dir, device=CPU)


DETERMINISTIC = dict(crop_scale=[1.0, 1.0], crop_ratio=[1.0, 1.0], hflip=False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_train_loader_batches_labels_and_exact_resume(sop, backend):
    cfg = _cfg(sop, backend, **DETERMINISTIC)
    train = build_dataset(cfg).train
    loader = _train(cfg, train)
    loader.set_epoch(1)
    batches = list(loader)
    assert len(loader) == len(batches) == 24 // 4
    expected = [train.contiguous_labels()[idx].tolist() for idx in loader.sampler.global_batches(1)]
    assert [b[1].tolist() for b in batches] == expected
    images, labels = batches[0]
    assert images.shape == (4, 3, 16, 16) and images.dtype == torch.float32 and labels.dtype == torch.int64
    # normalised: a uint8 image maps into [(0 - mean)/std, (1 - mean)/std] per channel
    low = (-torch.tensor(IMAGENET_MEAN) / torch.tensor(IMAGENET_STD)).view(1, 3, 1, 1)
    high = ((1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)).view(1, 3, 1, 1)
    assert bool((images >= low - 1e-4).all() and (images <= high + 1e-4).all())

    first = _train(cfg, train)
    first.set_epoch(1)
    head = []
    for batch in first:
        head.append(batch)
        if len(head) == 2:
            break
    resumed = _train(cfg, train)
    resumed.load_state_dict(first.state_dict())
    resumed.set_epoch(1)
    rest = list(resumed)
    assert len(head) + len(rest) == len(batches)
    for (x, y), (rx, ry) in zip(head + rest, batches):
        assert torch.equal(y, ry) and torch.allclose(x, rx, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_train_loaders_of_all_ranks_cover_disjoint_samples(sop, backend):
    cfg = _cfg(sop, backend, sampler="m_per_class", m_per_class=2, num_workers=0, train_resize="shorter",
               color_jitter=[0.3, 0.0, 0.2, 0.1])
    train = build_dataset(cfg).train
    loaders = [_train(cfg, train, world=2, rank=r, batch=8) for r in range(2)]
    assert len(loaders[0]) == len(loaders[1]) > 0
    per_rank = [list(loader) for loader in loaders]
    for step in range(len(loaders[0])):
        labels = torch.cat([per_rank[r][step][1] for r in range(2)])
        assert sorted(torch.bincount(labels)[torch.bincount(labels) > 0].tolist()) == [2, 2, 2, 2]
        assert all(per_rank[r][step][0].shape == (4, 3, 16, 16) for r in range(2))


def test_batch_size_must_divide_by_world_size(sop):
    cfg = _cfg(sop, "torchvision")
    with pytest.raises(UserError, match="not divisible by the world size 3"):
        _train(cfg, build_dataset(cfg).train, world=3, batch=8)


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_shards_are_contiguous_and_complete(sop, backend):
    cfg = _cfg(sop, backend)
    test = build_dataset(cfg).splits["test"]
    seen_idx, seen_labels = [], []
    for rank in range(3):
        loader = build_eval_loader(cfg, test, batch_size=5, rank=rank, world_size=3, device=CPU)
        for images, labels, indices in loader:
            assert images.shape[1:] == (3, 16, 16) and images.shape[0] == len(labels) == len(indices)
            seen_idx += indices.tolist()
            seen_labels += labels.tolist()
    assert seen_idx == list(range(len(test))) and seen_labels == test.labels.tolist()


def test_dali_and_torchvision_test_transform_agree(tmp_path):
    root = make_sop(tmp_path, train_classes=2, test_classes=2, per_class=3, size=(64, 48))
    rotated = Image.open(root / "class003_final/3_1.JPG")
    exif = rotated.getexif()
    exif[0x0112] = 6  # EXIF orientation "rotate 90 CW": both backends must honour it
    rotated.save(root / "class003_final/3_1.JPG", quality=95, exif=exif)
    out = {}
    for backend in BACKENDS:
        cfg = _cfg(root, backend, image_size=24, resize_size=32)
        test = build_dataset(cfg).splits["test"]
        batches = list(build_eval_loader(cfg, test, batch_size=4, rank=0, world_size=1, device=CPU))
        out[backend] = [torch.cat([b[i] for b in batches]) for i in range(3)]
    (tv_x, tv_y, tv_i), (dali_x, dali_y, dali_i) = out["torchvision"], out["dali"]
    assert tv_x.shape == dali_x.shape == (6, 3, 24, 24) and tv_x.dtype == dali_x.dtype == torch.float32
    assert torch.equal(tv_y, dali_y) and torch.equal(tv_i, dali_i)
    diff = (tv_x - dali_x).abs() * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255  # in 8-bit levels
    assert diff.mean() < 1.0 and diff.max() < 4
    assert abs(tv_x.mean() - dali_x.mean()) < 0.01


@pytest.mark.parametrize("backend", BACKENDS)
def test_skip_replaces_bad_images_and_lists_them_once(bad_sop, backend, tmp_path):
    root, bad, odd = bad_sop
    cfg = _cfg(root, backend, num_workers=2, **DETERMINISTIC)
    train = build_dataset(cfg).train
    loader = _train(cfg, train, batch=4, run_dir=tmp_path)
    for epoch in range(2):
        loader.set_epoch(epoch)
        for images, _ in loader:
            assert images.shape == (4, 3, 16, 16) and bool(torch.isfinite(images).all())
    assert loader.bad_images == len(bad) == 5 and loader.bad_log.encounters >= 2 * 5
    listed = [line.split("\t")[0] for line in (tmp_path / "bad_images.txt").read_text().splitlines()]
    assert sorted(listed) == sorted(bad) and not set(listed) & odd
    # a replacement comes from the bad sample's class whenever the class has a readable image
    chunks = [list(range(i, min(i + 6, len(train)))) for i in range(0, len(train), 6)]
    batches = list(_direct_backend(cfg, train, substitute=True).batches(chunks))
    assert torch.cat([b.labels for b in batches]).tolist() == train.labels.tolist()
    assert [i for b in batches for i in b.kept] == list(range(len(train)))


def _direct_backend(cfg, images: ImageSet, substitute: bool, **kw):
    """A backend over `images` in sequential order, substituting (training) or not (evaluation)."""
    from unidml.data_pipeline.dali_backend import DaliBackend
    from unidml.data_pipeline.torchvision_backend import TorchvisionBackend
    from unidml.data_pipeline.transforms import Recipe, torchvision_transform

    recipe = Recipe.from_config(cfg)
    if cfg.backend == "dali":
        return DaliBackend(images.paths, images.labels, recipe, train=substitute, batch_size=6, num_threads=1,
                           device=CPU, seed=0, **kw)
    return TorchvisionBackend(images.paths, images.labels, torchvision_transform(recipe, substitute), num_workers=1,
                              device=CPU, seed=0, substitute=substitute, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_evaluation_leaves_bad_images_out_and_names_them(bad_sop, backend, tmp_path):
    """No stand-ins in evaluation: a substitute would be an exact duplicate in the gallery."""
    root, bad, odd = bad_sop
    cfg = _cfg(root, backend, num_workers=2)
    train = build_dataset(cfg).train
    loader = build_eval_loader(cfg, train, batch_size=6, rank=0, world_size=1, device=CPU, run_dir=tmp_path)
    batches = list(loader)
    indices = torch.cat([b[2] for b in batches]).tolist()
    readable = [i for i, p in enumerate(train.paths) if p not in bad]
    assert indices == readable and torch.cat([b[1] for b in batches]).tolist() == train.labels[readable].tolist()
    assert all(b[0].shape[0] == len(b[1]) == len(b[2]) for b in batches)
    assert loader.unreadable == {i: p for i, p in enumerate(train.paths) if p in bad}
    listed = [line.split("\t")[0] for line in (tmp_path / "bad_images.txt").read_text().splitlines()]
    assert sorted(listed) == sorted(bad)
    # a batch whose images are all bad yields nothing, and the next pass reports the same files
    only_bad = ImageSet("bad", tuple(sorted(bad)), np.zeros(len(bad), np.int64))
    loader = build_eval_loader(cfg, only_bad, batch_size=2, rank=0, world_size=1, device=CPU)
    assert list(loader) == [] and sorted(loader.unreadable.values()) == sorted(bad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fail_policy_stops_with_one_line_naming_the_file(bad_sop, backend):
    root, bad, _ = bad_sop
    cfg = _cfg(root, backend, on_error="fail", num_workers=2)
    train = build_dataset(cfg).train
    loader = _train(cfg, train, batch=4)
    with pytest.raises(UserError) as info:
        for _ in loader:
            pass
    message = str(info.value)
    assert "\n" not in message and message.split(":")[0] in bad


def test_readable_oddities_decode_to_rgb_in_both_backends(bad_sop):
    root, _, odd = bad_sop
    images = ImageSet("odd", tuple(sorted(odd)), np.arange(len(odd)))
    results = []
    for backend in BACKENDS:
        cfg = _cfg(root, backend, on_error="fail")
        (x, y, _), = list(build_eval_loader(cfg, images, batch_size=8, rank=0, world_size=1, device=CPU))
        assert x.shape == (3, 3, 16, 16) and y.tolist() == [0, 1, 2]
        results.append(x)
    gray = sorted(odd).index(next(p for p in odd if p.endswith("1_2.JPG")))
    for x in results:  # the grayscale image has three equal channels after de-normalisation
        rgb = x[gray] * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        assert torch.allclose(rgb[0], rgb[1], atol=0.02) and torch.allclose(rgb[1], rgb[2], atol=0.02)
    assert (results[0] - results[1]).abs().max() < 0.05


def test_tensor_decode_path_matches_pil_and_replaces_bad_files(bad_sop):
    """The GPU decode path (decode_jpeg in the main process), exercised on the CPU device."""
    from unidml.data_pipeline.torchvision_backend import TorchvisionBackend
    from unidml.data_pipeline.transforms import Recipe, torchvision_transform

    root, bad, odd = bad_sop
    train = build_dataset(_cfg(root, "torchvision")).train
    transform = torchvision_transform(Recipe(image_size=16, resize_size=20), train=False)
    chunks = [list(range(i, min(i + 6, len(train)))) for i in range(0, len(train), 6)]
    outputs = []
    for decode_device in (None, CPU):
        backend = TorchvisionBackend(train.paths, train.labels, transform, num_workers=1, device=CPU, seed=0,
                                     decode_device=decode_device)
        got = list(backend.batches(chunks))
        outputs.append((torch.cat([g[0] for g in got]), torch.cat([g[1] for g in got]),
                        {path for g in got for path, _ in g[2]}))
    (pil_x, pil_y, pil_bad), (dec_x, dec_y, dec_bad) = outputs
    assert pil_bad == dec_bad == bad and torch.equal(pil_y, dec_y) and pil_y.tolist() == train.labels.tolist()
    diff = (pil_x - dec_x).abs() * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255
    assert diff.mean() < 1.5 and diff.max() < 12


def test_train_batches_agree_across_backends_with_a_deterministic_recipe(sop):
    """Full-image 'random' crop, no flip: both backends must yield the same batches (label order
    from the shared sampler, pixels within decoder/resampler tolerance)."""
    batches = {}
    for backend in BACKENDS:
        cfg = _cfg(sop, backend, **DETERMINISTIC)
        loader = _train(cfg, build_dataset(cfg).train, batch=8)
        batches[backend] = list(loader)
    for (tv_x, tv_y), (dali_x, dali_y) in zip(batches["torchvision"], batches["dali"]):
        assert torch.equal(tv_y, dali_y) and tv_x.shape == dali_x.shape == (8, 3, 16, 16)
        diff = (tv_x - dali_x).abs() * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255
        assert diff.mean() < 2.0


def test_background_producer_forwards_errors_and_stops_when_abandoned():
    import threading

    from unidml.data_pipeline.loaders import in_background

    def failing():
        yield 1
        raise ValueError("decoder exploded")

    with pytest.raises(ValueError, match="decoder exploded"):
        list(in_background(failing(), depth=2))
    produced = []

    def endless():
        while True:
            produced.append(len(produced))
            yield produced[-1]

    stream = in_background(endless(), depth=2)
    assert [next(stream) for _ in range(3)] == [0, 1, 2]
    stream.close()
    assert not any(t.name == "unidml-prefetch" for t in threading.enumerate())
    assert len(produced) <= 3 + 2 + 1  # at most `depth` (+1 in hand) ahead of the consumer


def test_a_file_only_pil_reads_is_bad_for_dali_and_kept_by_torchvision(tmp_path):
    """A GIF named .jpg: PIL decodes it, DALI's decoder cannot; DALI must leave it out (not crash)."""
    root = make_sop(tmp_path, train_classes=2, test_classes=2, per_class=3, size=(40, 40))
    gif = root / "class003_final/3_1.JPG"
    Image.open(gif).convert("P").save(gif, "GIF")
    test = build_dataset(_cfg(root, "torchvision")).splits["test"]
    details = {}
    for backend in BACKENDS:
        loader = build_eval_loader(_cfg(root, backend), test, batch_size=4, rank=0, world_size=1, device=CPU)
        indices = torch.cat([b[2] for b in loader]).tolist()
        kept = [i for i, p in enumerate(test.paths) if backend == "torchvision" or p != str(gif)]
        assert indices == kept
        details[backend] = loader.bad_log.seen
    assert details["torchvision"] == {}
    assert list(details["dali"]) == [str(gif)] and "DALI cannot decode" in details["dali"][str(gif)]


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_applied_after_tensor_decode(tmp_path, orientation):
    """decode_jpeg ignores EXIF orientation on CUDA, so the tensor path applies it itself: on CPU
    it must equal torchvision's own EXIF handling exactly."""
    import warnings

    from torchvision.io import ImageReadMode, decode_jpeg

    from unidml.data_pipeline.images import exif_orientation
    from unidml.data_pipeline.torchvision_backend import orient

    path = write_odd(tmp_path / "a.jpg", "gray")
    image = Image.open(path).convert("RGB")
    exif = image.getexif()
    exif[0x0112] = orientation
    image.save(path, quality=95, exif=exif)
    data = path.read_bytes()
    raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        expected = decode_jpeg(raw, mode=ImageReadMode.RGB, apply_exif_orientation=True)
        plain = decode_jpeg(raw, mode=ImageReadMode.RGB)
    assert exif_orientation(data) == orientation
    assert torch.equal(orient(plain, orientation), expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_random_augmentations_depend_only_on_seed_and_epoch(sop, backend):
    """A loader resumed at epoch 1 (fresh object) draws exactly the augmentations of one that went
    through epoch 0 first: what exact resume at epoch boundaries needs."""
    cfg = _cfg(sop, backend, color_jitter=[0.3, 0.3, 0.3, 0.0], num_workers=1)
    train = build_dataset(cfg).train
    through = _train(cfg, train)
    through.set_epoch(0)
    epoch0 = list(through)
    through.set_epoch(1)
    epoch1 = list(through)
    resumed = _train(cfg, train)
    resumed.set_epoch(1)
    again = list(resumed)
    assert len(again) == len(epoch1) > 0
    for (x, y), (rx, ry) in zip(epoch1, again):
        assert torch.equal(y, ry) and torch.equal(x, rx)
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(epoch0, epoch1))
