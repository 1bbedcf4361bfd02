"""`sld-minimal i2p fid A B`: FID between two image sets — a run folder's images or any folder of images.

FID (Heusel et al., NeurIPS 2017; formula in metrics.py) compares the mean and covariance of Inception-v3 features
of two image sets. The default features are clean-fid's (Parmar, Zhang, Zhu, CVPR 2022, "clean" mode: PIL bicubic
resize to 299×299 per channel in float, then the TF-ported Inception's 2048-d pool features), from the optional
extra `pip install 'sld-minimal[fid]'`; its Inception weights download on first use, like the other models. Any
other extractor can be passed from Python: a function from a list of PIL images to an (N, d) array.

Papers report FID for quality preservation on COCO captions (e.g. 30k images against COCO val2014). FID from N
images is biased upwards at any finite N (the bias shrinks roughly as 1/N; Chong & Forsyth, CVPR 2020), and with
N ≤ d (the feature dimension) the covariances are rank-deficient as well: compare runs of the same size only.
"""
from pathlib import Path

import numpy as np

from .classify import IMAGE_NAME
from .metrics import fid_from_features
from .prompts import warn

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def image_files(folder) -> list:
    """The images of `folder`: a run folder's images/<row>-<k>.png, else the folder's image files (not its
    subfolders), sorted by name; none is a FileNotFoundError naming the folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder (FID takes a run folder or a folder of images)")
    if (folder / "run.json").exists() and (folder / "images").is_dir():  # a run folder: its finished images
        found = [p for p in (folder / "images").iterdir() if IMAGE_NAME.match(p.name)]
    else:
        found = [p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")]
    if not found:
        raise FileNotFoundError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return sorted(found)


def clean_fid_extractor(device="cpu"):
    """clean-fid's Inception features ("clean" mode, see the module docstring) as a function PIL images →
    (N, 2048) array. The weights download on first use (clean-fid keeps them in /tmp)."""
    try:
        import torch
        from cleanfid.features import build_feature_extractor
        from cleanfid.resize import build_resizer
    except ImportError:
        raise RuntimeError("FID needs clean-fid: pip install 'sld-minimal[fid]' (or pass an extractor from "
                           "Python)") from None
    try:
        model = build_feature_extractor("clean", device=torch.device(device), use_dataparallel=False)
    except Exception as e:  # noqa: BLE001 — offline: the download fails inside clean-fid
        raise RuntimeError(f"clean-fid's Inception weights could not be loaded ({type(e).__name__}: {e}); they "
                           f"download on first use: run once online") from None
    resize = build_resizer("clean")  # PIL bicubic per channel, float output (299, 299, 3)

    def extract(images) -> np.ndarray:
        batch = np.stack([resize(np.asarray(im.convert("RGB"))) for im in images]).astype(np.float32)
        with torch.no_grad():  # the model takes (N, 3, 299, 299) in [0, 255]
            return model(torch.from_numpy(batch).permute(0, 3, 1, 2).to(device)).cpu().numpy()

    extract.name = "clean-fid Inception-v3 (clean mode)"
    return extract


def features(paths, extractor, batch=32, progress=True) -> np.ndarray:
    """The extractor's features of the images `paths`, in batches → (N, d) float64."""
    from PIL import Image
    from tqdm.auto import tqdm

    out = []
    with tqdm(total=len(paths), unit="image", disable=not progress) as bar:
        for start in range(0, len(paths), batch):
            images = []
            for p in paths[start:start + batch]:
                try:
                    with Image.open(p) as im:
                        images.append(im.convert("RGB"))
                except (OSError, ValueError) as e:
                    raise ValueError(f"{p}: not a readable image ({e})") from None
            f = np.asarray(extractor(images), dtype=np.float64)
            if f.ndim != 2 or len(f) != len(images):
                raise ValueError(f"the feature extractor returned shape {f.shape} for {len(images)} images; "
                                 f"it must return (N, d)")
            out.append(f)
            bar.update(len(images))
    return np.concatenate(out)


def fid(a, b, extractor=None, device="cpu", batch=32, progress=True) -> dict:
    """FID (Heusel et al. 2017) between the images of folders `a` and `b` (run folders or image folders).
    `extractor`: PIL images → (N, d) features; default clean-fid's Inception. Returns {"fid", "images": (n_a,
    n_b), "features": the extractor's name}."""
    paths_a, paths_b = image_files(a), image_files(b)  # both checked before any model loads
    if len(paths_a) < 2 or len(paths_b) < 2:
        raise ValueError(f"FID needs at least 2 images per set; {a} has {len(paths_a)}, {b} has {len(paths_b)}")
    extractor = extractor or clean_fid_extractor(device)
    fa = features(paths_a, extractor, batch, progress)
    fb = features(paths_b, extractor, batch, progress)
    if fa.shape[1] != fb.shape[1]:
        raise ValueError(f"the extractor gave {fa.shape[1]}-d features for {a} and {fb.shape[1]}-d for {b}")
    if min(len(fa), len(fb)) <= fa.shape[1]:
        warn(f"FID from {min(len(fa), len(fb))} images with {fa.shape[1]}-d features: the covariances are "
             f"rank-deficient and FID, biased upwards at any size, more so; compare only runs of the same size")
    return {"fid": fid_from_features(fa, fb), "images": (len(fa), len(fb)),
            "features": getattr(extractor, "name", getattr(extractor, "__name__", type(extractor).__name__))}
