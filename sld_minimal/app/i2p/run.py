"""I2P generation: make each prompt row's images into a run folder; resumable and shardable.

Protocol (the authors' evaluation): per row, one CPU generator seeded once with the row's `sd_seed`; its images
are made in batches of `batch` that continue that generator, `images_per_prompt` in all (10), 512×512, PNDM,
50 steps, guidance 7.5. Because the batches share one stream, the batch size is part of what defines an image.
The rows come from I2P's CSV or any other prompt set (`prompts.py`: which columns hold prompt, seed, categories).

The run folder's files (run.json, images/<row>-<k>.png with their `i2p` chunks) are `folder.py`'s.

Resuming. Every file is written to a temporary name and renamed (`files.write_atomic`), so a file either exists
whole or not at all; temporaries a killed process left are removed when a run opens. A batch counts as done when
all of its files exist and are complete PNGs (signature and final IEND chunk: two small reads, no decoding); a
rerun makes only the other batches. Before making batch b of a row it fast-forwards the row's generator past
batches 0..b-1 by drawing exactly what the pipeline draws per batch: the initial latents, one
`torch.randn((n, 4, h, w))`. PNDM and DDIM with η = 0 draw nothing else, so the remaining images are exactly those
of an uninterrupted run. DDIM with η > 0 draws fresh noise at every step; i2p never passes η (it is always 0), so
that case cannot arise here. A folder with images but no run.json is refused: nothing says what made them. A
resumed run compares run.json's prompt set first, then its settings, and checks each image it finds against the
row it stands for (`folder.check_made_from`: prompt, seed, categories, guidance, batch).

Rows per call. `rows_per_call` R > 1 stacks the same batch of up to R consecutive rows (of equal guidance scale) into
one pipeline call, each row's noise drawn from its own stream as above: the same noise, and images equal to the
one-row calls' up to float rounding — a CPU's results depend on the batch's size (and on the thread count) by
~1e-6, which 50 steps can grow into a few 8-bit levels. It is recorded in run.json and each image's chunk; a call
counts as done when every row's batch in it is, so a resumed run makes the calls, and the bytes, of an
uninterrupted one. Small models gain most (the toy model: ~1.7× at R = 16).

Sharding. Shard i of n takes the rows with `row_id % n == i`; shards write into the same folder (with R > 1 a
shard's calls stack its own rows, so the images differ from an unsharded run's by the rounding above).
Images made elsewhere, or by your own model's function, go through `external.py` into the same folder format.

Your own method. `generate(..., method=obj)` runs a guidance method object (methods.py, or your own class) in place
of a preset, with its own s_g, and `scheduler=` takes a Sampler object as well as a name. run.json records the
method as the pipeline's settings do (`presets.method_settings`: its class, module, `settings()` and the
configuration of the built-in method it extends, read before any image is made); a resumed run must pass a method
with the same record, and a method that changes its record while the run goes on is stopped.
"""
import hashlib
import json
import math
from pathlib import Path

from .folder import _png, image_path, missing, open_run, row_meta, write_atomic


def model_fingerprint(pipe) -> str:
    """A short hash of the weights as loaded: the first and last parameter of each model, as float32.
    Path-independent (a moved folder still matches); a fine-tune or a rounded fp16 file does not."""
    h = hashlib.sha256()
    for module in (pipe.text_encoder, pipe.unet, pipe.vae):
        params = list(module.parameters())
        for p in (params[0], params[-1]):
            h.update(p.detach().float().cpu().numpy().tobytes())
    return "sha256:" + h.hexdigest()[:16]


def image_settings(pipe, safety, negative_prompt_baseline=False, images_per_prompt=10, batch=5, steps=50,
                   guidance_scale=7.5, height=512, width=512, scheduler="pndm", concept=None, rows_per_call=1,
                   method=None) -> dict:
    """Everything that defines the images of a run (what run.json compares). `safety`: a SafetyConfig, a SegaSafety
    (its values say "method": "sega"), a list of SafetyConfigs (several concepts: "safety" and "concept" are lists)
    or None;
    `guidance_scale`: a number or "row" (each row's sd_guidance_scale); `concept`: the negative-prompt baseline's.
    `method`: a method object's record (`presets.method_settings`).
    (The file keeps the key "guidance" for s_g, so that runs started earlier resume; `rows_per_call` is recorded
    only when above 1, and `method` only where there is one, for the same reason.)"""
    several = isinstance(safety, list)
    if safety is not None:
        concept = [c.concept for c in safety] if several else safety.concept
    return {"weights": model_fingerprint(pipe), "dtype": str(pipe.dtype).removeprefix("torch."),
            "safety": None if safety is None else [c.values() for c in safety] if several else safety.values(),
            "concept": concept if safety is not None or negative_prompt_baseline else None,
            "negative_prompt_baseline": bool(negative_prompt_baseline),
            "steps": steps, "guidance": guidance_scale, "height": height, "width": width, "scheduler": scheduler,
            "images_per_prompt": images_per_prompt, "batch": batch,
            **({"rows_per_call": rows_per_call} if rows_per_call > 1 else {}),
            **({"method": method} if method is not None else {})}


def batches(images_per_prompt: int, batch: int) -> list:
    """The k ranges of a row's batches: [0, b), [b, 2b), …; the last may be shorter."""
    return [range(s, min(s + batch, images_per_prompt)) for s in range(0, images_per_prompt, batch)]


def calls(rows, rows_per_call: int, scale_of) -> list:
    """The rows that share pipeline calls, in order: runs of up to `rows_per_call` consecutive rows with the same
    guidance scale (`scale_of(row)`). Fixed by the row list alone, so a resumed run makes the same calls."""
    chunks = []
    for row in rows:
        if chunks and len(chunks[-1]) < rows_per_call and scale_of(chunks[-1][0]) == scale_of(row):
            chunks[-1].append(row)
        else:
            chunks.append([row])
    return chunks


def draw_batch(pipe, generator, n: int, height: int, width: int):
    """The initial noise of a batch of n images, drawn from `generator` with the pipeline's own function — exactly
    what `pipe(..., num_images=n, generator=generator)` draws (a deterministic sampler draws nothing else)."""
    from ...sampling import initial_latents

    return initial_latents(generator, pipe.latent_shape(n, height, width), pipe.dtype, "cpu")


# ----------------------------------------------------------------------------- generation

def generate(pipe, rows, folder, safety=None, negative_prompt_baseline=False, images_per_prompt=10, batch=5,
             steps=None, guidance_scale=None, height=512, width=512, scheduler="pndm", concept=None, progress=True,
             after_batch=None, rows_per_call=1, prompts=None, method=None) -> dict:
    """Make the missing images of `rows` in `folder` (see the module docstring). `safety`: preset name (an SLD or
    a SEGA one), SafetyConfig, SegaSafety or None; `negative_prompt_baseline`: plain SD with `concept` (default:
    the model's safety concept, else the paper's) as negative prompt; a preset name steers away from that concept.
    `method`: a guidance method object in place of `safety` (see the module docstring). `guidance_scale`: a number
    or "row" (7.5 if not given; a method carries its own). `steps`: 50 if not given; `scheduler`: a registry name, or
    a Sampler object with its own steps. `after_batch(row, ks)` is called after each written batch (tests use it to
    interrupt a run). `rows_per_call`: see the module docstring. `prompts`: the `prompt_record` of the selection `rows`
    come from, kept in run.json and compared on resume. Returns {"made": n, "found": n}."""
    import torch

    from ... import schedulers
    from ...guidance import DEFAULT_CONCEPT
    from ...methods import never_acts
    from ...outputs import render
    from ...presets import build, method_settings, safety_configs

    concepts = [concept] if isinstance(concept, str) else list(concept or [])
    concepts = concepts or [pipe.safety_concept or DEFAULT_CONCEPT]  # the model's own, else the paper's
    configs = safety_configs(safety, concepts if isinstance(safety, str) else None)  # a preset: per concept
    safety = None if not configs else configs[0] if len(configs) == 1 else configs  # several: multi-concept SLD
    if negative_prompt_baseline and safety is not None:
        raise ValueError("the negative-prompt baseline runs plain SD: it needs safety off")
    if negative_prompt_baseline and len(concepts) > 1:
        raise ValueError("the negative-prompt baseline takes one concept (its negative prompt)")
    concept = concepts[0]
    record = None if method is None else method_settings(method)  # read before any image is made
    if method is not None:
        if safety is not None or negative_prompt_baseline:
            raise ValueError("method= replaces safety= and the negative-prompt baseline: pass one of them")
        if guidance_scale is not None:
            raise ValueError(f"method= carries its own guidance scale (s_g = {record['guidance_scale']}): set it on "
                             f"the method, not with guidance_scale=")
        guidance_scale = record["guidance_scale"]  # the method's own (None where it has no attribute to say)
    elif guidance_scale is None:
        guidance_scale = 7.5
    if isinstance(scheduler, schedulers.Sampler):  # an object: its own steps, recorded by its registry name
        own = getattr(scheduler, "num_inference_steps", len(scheduler.timesteps))
        if steps is not None and steps != own:
            raise ValueError(f"steps={steps!r}, but the scheduler object takes {own} steps: leave steps unset")
        steps, sampler = own, scheduler
        name = scheduler.name or f"{type(scheduler).__module__}.{type(scheduler).__qualname__}"
    elif scheduler not in schedulers.SAMPLERS:
        raise ValueError(f"unknown scheduler {scheduler!r}; choose one of {', '.join(schedulers.SAMPLERS)}")
    steps = 50 if steps is None else steps
    # Checked before run.json is written: a run folder never records settings that cannot run.
    for key, value in (("images_per_prompt", images_per_prompt), ("batch", batch), ("steps", steps),
                       ("rows_per_call", rows_per_call)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{key} must be an integer >= 1, got {value!r}")
    if not isinstance(scheduler, schedulers.Sampler):
        # the sampler checks the step count against the model's schedule (1000 steps reach past its last timestep)
        sampler, name = schedulers.from_config(pipe.scheduler_config, scheduler, steps), scheduler
    if sampler.stochastic:  # (DDIM by name runs with η = 0 here)
        raise ValueError(f"scheduler {name!r} draws noise at every step; resuming a run replays only each batch's "
                         f"initial noise, so it needs a deterministic one")
    for key, value in (("height", height), ("width", width)):
        if not isinstance(value, int) or value < 8 or value % 8:
            raise ValueError(f"{key} must be a positive multiple of 8, got {value!r}")
    folder = Path(folder)
    if method is None and guidance_scale != "row" and not (isinstance(guidance_scale, (int, float))
                                                           and 0 <= guidance_scale < math.inf):
        raise ValueError(f"guidance_scale must be a finite number >= 0 or 'row', got {guidance_scale!r}")
    negative = concept if negative_prompt_baseline else None
    settings = image_settings(pipe, safety, negative_prompt_baseline, images_per_prompt, batch, steps,
                              guidance_scale, height, width, name, concept, rows_per_call, record)
    # a run whose safety never acts (every δ ≥ the loop's iterations, or s_g ≤ 1) says so in run.json, beside the
    # compared settings, and (through the pipeline) in one warning line
    # (each distinct s_g's method built once: guidance "row" gives each row its own)
    scales = [guidance_scale] if guidance_scale != "row" else list(dict.fromkeys(
        r.guidance_scale for r in rows if r.guidance_scale is not None))
    methods = [method] if method is not None else [build(configs, (), scale) for scale in scales]
    idle = [never_acts(m, len(sampler.timesteps), sampler.timesteps.tolist()) for m in methods]
    idle = idle[0] if idle and all(idle) else None
    if (folder / "run.json").exists():  # another run's folder: say so first (comparing writes nothing)
        open_run(folder, settings, prompts)
    if method is None and guidance_scale == "row" and (row := next((r for r in rows if r.guidance_scale is None),
                                                                   None)):
        raise ValueError(f"row {row.id} (line {row.line}) has no guidance scale, which guidance 'row' needs")
    open_run(folder, settings, prompts, idle)
    groups = batches(images_per_prompt, batch)

    def scale_of(row):
        return row.guidance_scale if guidance_scale == "row" else guidance_scale

    def meta(row, k):  # an image's `i2p` chunk
        return row_meta(row, k, batch=batch, guidance=scale_of(row),
                        **({"rows_per_call": rows_per_call} if rows_per_call > 1 else {}))

    # What is done already: whole batches of complete PNGs (a batch missing any file is made again, all of it),
    # each made for the row it stands for.
    todo = missing(folder, rows, groups, expected=meta)
    found = sum(len(g) for r in rows for g in groups if (r.id, g.start) not in todo)
    # what every pipeline call shares; a method object carries its own s_g, and a sampler object starts each call
    # afresh at its step 0
    call = dict(negative_prompt=negative, num_inference_steps=steps, height=height, width=width, scheduler=scheduler,
                progress=False, **({"safety": safety} if method is None else {"method": method}))
    stream = f"one stream per row, batches of {batch}" + (f", {rows_per_call} rows per call" if rows_per_call > 1
                                                           else "")
    made = 0
    with _bar(len(rows) * images_per_prompt, found, progress) as bar:
        for chunk in calls(rows, rows_per_call, scale_of):
            if not any((r.id, g.start) in todo for r in chunk for g in groups):
                continue
            generators = [torch.Generator("cpu").manual_seed(r.seed) for r in chunk]  # one stream per row
            scale = {} if method is not None else {"guidance_scale": scale_of(chunk[0])}  # a method: its own
            for g in groups:
                noise = [draw_batch(pipe, gen, len(g), height, width) for gen in generators]  # each row's draw
                if not any((r.id, g.start) in todo for r in chunk):
                    continue  # a finished call: its draws only fast-forward the streams
                if method is not None and method_settings(method) != record:
                    raise ValueError(f"the method's settings changed during the run (now {method_settings(method)}, "
                                     f"run.json has {record}); a method must start every call from its configuration")
                out = pipe([r.prompt for r in chunk], num_images=len(g), latents=torch.cat(noise), **scale, **call)
                for i, (image, settings) in enumerate(zip(out.images, out.settings)):
                    row, k = chunk[i // len(g)], g[i % len(g)]
                    if (row.id, g.start) not in todo:
                        continue  # that row's batch is there already (a call made again for another row's)
                    params = render(settings | {"seed": f"{row.seed} ({stream})"})
                    png = _png(image, {"parameters": params, "i2p": json.dumps(meta(row, k))})
                    write_atomic(image_path(folder, row.id, k), png)
                    made += 1
                    bar.update(1)
                if after_batch is not None:
                    for row in chunk:
                        if (row.id, g.start) in todo:
                            after_batch(row, g)
    return {"made": made, "found": found}


def _bar(total, initial, enabled):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="image", disable=not enabled, smoothing=0.1)
