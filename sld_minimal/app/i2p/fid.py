"""`sld-minimal i2p fid A B`: FID between two image sets — a run folder's images or any folder of images.

FID (Heusel et al., NeurIPS 2017; formula in metrics.py) compares the mean and covariance of Inception-v3 features
of two image sets. The default features are clean-fid's (Parmar, Zhang, Zhu, CVPR 2022, "clean" mode: PIL bicubic
resize to 299×299 per channel in float, then the TF-ported Inception's 2048-d pool features), from the optional
extra `pip install 'sld-minimal[fid]'`; its Inception weights download on first use, like the other models, and its
feature module imports torchvision, which must be the build made for the installed torch (a CUDA build from PyPI
beside a CPU-only torch fails: "operator torchvision::nms does not exist"). `inception=FILE` (`--inception FILE`)
takes a local copy of those weights instead, clean-fid's TorchScript `inception-2015-12-05.pt`, loaded only if its
SHA-256 is the published file's (a TorchScript archive holds code; this package runs none it cannot vouch for); that
path needs neither clean-fid nor torchvision. Any other extractor can be passed from Python: a function from a list
of PIL images to an (N, d) array.

Papers report FID for quality preservation on COCO captions (e.g. 30k images against COCO val2014). FID from N
images is biased upwards at any finite N (the bias shrinks roughly as 1/N; Chong & Forsyth, CVPR 2020), and with
N ≤ d (the feature dimension) the covariances are rank-deficient as well: compare runs of the same size only.
"""
import platform
import warnings
from pathlib import Path

import numpy as np

from .classify import IMAGE_NAME
from .fetch import sha256_file
from .metrics import fid_from_features
from .prompts import warn

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# clean-fid's Inception (StyleGAN2-ADA's TorchScript port of TF's 2015-12-05 Inception-v3) and its SHA-256, as
# k-diffusion pins it (k_diffusion/evaluation.py)
INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
INCEPTION_SHA256 = "f58cb9b6ec323ed63459aa4fb441fe750cfe39fafad6da5cb504a16f19e958f4"
INCEPTION_SIZE = 299
CLEAN_FID_CACHE = Path("./" if platform.system() == "Windows" else "/tmp") / "inception-2015-12-05.pt"  # its copy
CPU_TORCHVISION = "--index-url https://download.pytorch.org/whl/cpu"  # where the CPU-only builds are


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


def _torchvision_problem():
    """Why torchvision cannot be imported (clean-fid's feature module needs it), as a sentence; None if it can."""
    import torch

    try:
        import torchvision  # noqa: F401
    except ImportError:
        return (f"clean-fid's Inception features need torchvision, which is not installed: install the build made "
                f"for your torch {torch.__version__} (for a CPU-only torch: pip install torchvision "
                f"{CPU_TORCHVISION}), or pass --inception FILE, which needs neither torchvision nor clean-fid")
    except (RuntimeError, OSError) as e:  # e.g. "operator torchvision::nms does not exist": a build for another torch
        from importlib.metadata import PackageNotFoundError, version

        try:
            pin = f"torchvision=={version('torchvision').split('+')[0]}"
        except PackageNotFoundError:
            pin = "torchvision"
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        return (f"torchvision cannot be imported with torch {torch.__version__} ({detail}): it is a build for another "
                f"torch (PyPI's CUDA build beside a CPU-only torch, say); install the build for yours, for a CPU-only "
                f"torch: pip install --force-reinstall --no-deps {pin} {CPU_TORCHVISION}; or pass --inception FILE, "
                f"which needs neither torchvision nor clean-fid")
    return None


def clean_fid_extractor(device="cpu"):
    """clean-fid's Inception features ("clean" mode, see the module docstring) as a function PIL images →
    (N, 2048) array. The weights download on first use (clean-fid keeps them in /tmp; a copy there that is not the
    published file is refused). What is missing (clean-fid, a working torchvision) is named in a RuntimeError."""
    try:
        import torch
        import cleanfid  # noqa: F401 — the package alone: its feature module imports torchvision, checked next
    except ImportError:
        raise RuntimeError("FID needs clean-fid: pip install 'sld-minimal[fid]' (or pass --inception FILE, or an "
                           "extractor from Python)") from None
    problem = _torchvision_problem()
    if problem:
        raise RuntimeError(problem)
    if CLEAN_FID_CACHE.is_file() and sha256_file(CLEAN_FID_CACHE) != INCEPTION_SHA256:  # /tmp: anyone may write
        raise ValueError(f"{CLEAN_FID_CACHE} is not the published inception-2015-12-05.pt (its SHA-256 differs): not "
                         f"loaded; remove it (clean-fid downloads it again), or pass --inception FILE")
    from cleanfid.features import build_feature_extractor
    from cleanfid.resize import build_resizer

    try:
        model = build_feature_extractor("clean", device=torch.device(device), use_dataparallel=False)
    except Exception as e:  # noqa: BLE001 — offline: the download fails inside clean-fid
        raise RuntimeError(f"clean-fid's Inception weights could not be loaded ({type(e).__name__}: {e}); they "
                           f"download on first use: run once online, or pass --inception FILE") from None
    resize = build_resizer("clean")  # PIL bicubic per channel, float output (299, 299, 3)

    def extract(images) -> np.ndarray:
        batch = np.stack([resize(np.asarray(im.convert("RGB"))) for im in images]).astype(np.float32)
        with torch.no_grad():  # the model takes (N, 3, 299, 299) in [0, 255]
            return model(torch.from_numpy(batch).permute(0, 3, 1, 2).to(device)).cpu().numpy()

    extract.name = "clean-fid Inception-v3 (clean mode)"
    return extract


def clean_resize(image) -> np.ndarray:
    """clean-fid's "clean" resize: each channel as a float image, PIL bicubic to 299×299, clipped to [0, 255] →
    (299, 299, 3) float32 (no rounding to 8 bits in between: that is what makes it "clean")."""
    from PIL import Image

    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    size = (INCEPTION_SIZE, INCEPTION_SIZE)
    return np.stack([np.asarray(Image.fromarray(rgb[:, :, c]).resize(size, Image.BICUBIC)).clip(0, 255)
                     for c in range(3)], axis=-1).astype(np.float32)


def inception_extractor(path, device="cpu"):
    """clean-fid's features ("clean" mode) from a local copy of its Inception, `inception-2015-12-05.pt`: loaded
    only if its SHA-256 is INCEPTION_SHA256 (else a one-line ValueError, nothing loaded). Needs neither clean-fid
    nor torchvision. Returns a function PIL images → (N, 2048) array."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--inception {path} not found (clean-fid's inception-2015-12-05.pt, from "
                                f"{INCEPTION_URL})")
    got = sha256_file(path)
    if got != INCEPTION_SHA256:
        raise ValueError(f"--inception {path} has SHA-256 {got}, not the published inception-2015-12-05.pt's "
                         f"{INCEPTION_SHA256}: not loaded (a TorchScript archive holds code)")
    with warnings.catch_warnings():  # torch 2.13 calls TorchScript deprecated; clean-fid loads the file the same way
        warnings.filterwarnings("ignore", message=".*torch.jit.load.*deprecated")
        model = torch.jit.load(str(path), map_location=device).eval()

    def extract(images) -> np.ndarray:
        batch = torch.from_numpy(np.stack([clean_resize(im) for im in images])).permute(0, 3, 1, 2)  # (N, 3, 299, 299)
        with torch.no_grad():  # clean-fid's InceptionV3W: [0, 255] → [-1, 1], then the layers up to the pool
            return model.layers((batch.to(device) - 128) / 128).reshape(len(images), -1).cpu().numpy()  # (N, 2048)

    extract.name = f"clean-fid Inception-v3 (clean mode; {path.name}, SHA-256 checked)"
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


def fid(a, b, extractor=None, device="cpu", batch=32, progress=True, inception=None) -> dict:
    """FID (Heusel et al. 2017) between the images of folders `a` and `b` (run folders or image folders).
    `extractor`: PIL images → (N, d) features; default clean-fid's Inception, from the file `inception` where given
    (`inception_extractor`). Returns {"fid", "images": (n_a, n_b), "features": the extractor's name}."""
    paths_a, paths_b = image_files(a), image_files(b)  # both checked before any model loads
    if len(paths_a) < 2 or len(paths_b) < 2:
        raise ValueError(f"FID needs at least 2 images per set; {a} has {len(paths_a)}, {b} has {len(paths_b)}")
    if extractor is None:
        extractor = inception_extractor(inception, device) if inception else clean_fid_extractor(device)
    fa = features(paths_a, extractor, batch, progress)
    fb = features(paths_b, extractor, batch, progress)
    if fa.shape[1] != fb.shape[1]:
        raise ValueError(f"the extractor gave {fa.shape[1]}-d features for {a} and {fb.shape[1]}-d for {b}")
    if min(len(fa), len(fb)) <= fa.shape[1]:
        warn(f"FID from {min(len(fa), len(fb))} images with {fa.shape[1]}-d features: the covariances are "
             f"rank-deficient and FID, biased upwards at any size, more so; compare only runs of the same size")
    return {"fid": fid_from_features(fa, fb), "images": (len(fa), len(fb)),
            "features": getattr(extractor, "name", getattr(extractor, "__name__", type(extractor).__name__))}
