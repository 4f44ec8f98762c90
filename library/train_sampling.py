"""Sample images during training (kohya's ``sample_images``: ``train_util.sample_images_common``,
``line_to_prompt_dict``, ``load_prompts``, ``get_my_scheduler``, ``sample_image_inference``).

Prompts come from ``--sample_prompts``:

- ``.txt``: one prompt a line, blank lines and ``#`` comments skipped, options after `` --``:
  ``--n`` negative prompt, ``--w``/``--h`` width/height, ``--d`` seed, ``--l`` CFG scale, ``--s`` steps
  (clamped to 1..1000 as kohya), ``--ss`` sampler;
- ``.toml``: ``[prompt]`` defaults and ``[[prompt.subset]]`` entries (each merged over the defaults);
- ``.json``: a list of dicts with kohya's keys (``prompt``, ``negative_prompt``, ``width``, ``height``,
  ``seed``, ``sample_steps``, ``scale``, ``sample_sampler``) or of ``.txt``-style strings.

Defaults as kohya: 512x512, 30 steps, scale 7.5, the ``--sample_sampler`` (default ddim), a random seed;
sizes are rounded down to a multiple of 8 (at least 64). When: ``--sample_at_first`` before the first
step, ``--sample_every_n_epochs`` at epoch ends (``--sample_every_n_steps`` is then ignored, as kohya),
else ``--sample_every_n_steps`` after update steps. Files: ``<output_dir>/sample/<output_name>_<e{epoch:06d}
or {step:06d}>_<prompt index:02d>_<YYYYmmddHHMMSS>[_<seed>].png`` (kohya's names), the prompt, seed,
sampler etc. in the PNG's text chunks.

Generation reuses ``library.sdxl_pipeline.Generator`` on the models being trained: LoRA applied
(multiplier 1, not merged), models in eval mode while sampling (no LoRA dropout) and every cell's
train/eval flag restored afterwards; the text encoders keep returning all hidden states (the training
step needs them). Randomness comes from a numpy generator per prompt (seeded by ``--d``, or fresh OS
entropy): the trainer's numpy generator, ``random`` and ``np.random`` are not touched.

Differences from kohya (on purpose): an option or key this port does not understand, a bad value, a
sampler name that is not one of kohya's 16 (or a step count it cannot take: pndm needs 4), or a size the
model cannot take stops the run at start with the file and line (kohya logs and ignores, or falls back to
DDIM for an unknown ``--ss``); the prompt text before
the first `` --`` is never read as an option (kohya parses ``w 512 ...`` at the start of a prompt as a
width); comment lines may be indented; a ``.toml`` subset may override a ``[prompt]`` default (kohya
raises); the initial noise is numpy's, so a seed gives a different image than kohya's torch noise.

Prompts are weighted as kohya's SDXL sample pipeline weights them, whether or not ``--weighted_captions``
is given: ``(word:1.2)``, ``(word)`` = x1.1, ``[word]`` = /1.1 multiply the text encoders' hidden states of
those tokens (``library.prompt_weighting``; ``\\(`` is a literal bracket), and a prompt may be as long as
``--max_token_length`` allows (75 tokens by default; cut with a warning beyond).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import time
from typing import Dict, List, Optional

from library.device_utils import UserError
from library.prompt_weighting import parse_prompt_attention

logger = logging.getLogger(__name__)

DEFAULT_WIDTH = 512
DEFAULT_HEIGHT = 512
DEFAULT_STEPS = 30
DEFAULT_SCALE = 7.5
SAMPLE_ARGS = ("sample_every_n_steps", "sample_every_n_epochs", "sample_at_first")
PROMPT_KEYS = ("prompt", "negative_prompt", "width", "height", "seed", "sample_steps", "scale", "sample_sampler")
# keys kohya's parser knows that its SDXL sampling does not use (other model families) or cannot use
OTHER_MODEL_KEYS = {"guidance_scale": "--g", "controlnet_image": "--cn", "cfg_trunc_ratio": "--ctr",
                    "renorm_cfg": "--rcfg", "flow_shift": "--fs"}

# kohya's line options: (regex on the text after " --", key, converter); matched case-insensitively
_OPTIONS = (
    (r"w (\d+)", "width", int),
    (r"h (\d+)", "height", int),
    (r"d (\d+)", "seed", int),
    (r"s (\d+)", "sample_steps", lambda v: max(1, min(1000, int(v)))),
    (r"l ([\d\.]+)", "scale", float),
    (r"g ([\d\.]+)", "guidance_scale", float),
    (r"n (.+)", "negative_prompt", str),
    (r"ss (.+)", "sample_sampler", str),
    (r"cn (.+)", "controlnet_image", str),
    (r"ctr (.+)", "cfg_trunc_ratio", float),
    (r"rcfg (.+)", "renorm_cfg", float),
    (r"fs (.+)", "flow_shift", str),
)


def line_to_prompt_dict(line: str, where: Optional[str] = None) -> dict:
    """kohya's ``line_to_prompt_dict``: ``prompt --opt value --opt value``. Options are matched as kohya does
    (prefix regex, case-insensitive), except that the prompt text itself is not parsed as an option. With
    ``where`` ("file:line"), a segment that no option matches, or whose value does not convert, is a UserError;
    without it, it is skipped (as kohya)."""
    parts = line.split(" --")
    prompt_dict = {"prompt": parts[0]}
    for part in parts[1:]:
        for pattern, key, convert in _OPTIONS:
            m = re.match(pattern, part, re.IGNORECASE)
            if m is None:
                continue
            if where is not None and re.fullmatch(pattern, part.rstrip(), re.IGNORECASE) is None:
                raise UserError(f"{where}: option '--{part}': cannot read the value")
            try:
                prompt_dict[key] = convert(m.group(1))
            except ValueError:
                if where is not None:
                    raise UserError(f"{where}: option '--{part}': cannot read the value") from None
                logger.error("cannot parse prompt option: %s", part)
            break
        else:
            if where is not None:
                raise UserError(f"{where}: '--{part}' is not an option this port reads (--n text, --w int, "
                                "--h int, --d int, --l number, --s int, --ss sampler)")
    return prompt_dict


def _read_prompt_entries(path: str):
    """-> [(where, str or dict)] from a .txt, .toml or .json prompt file; UserError on an unreadable file."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: sample prompts file not found")
    ext = os.path.splitext(path)[1].lower()
    try:
        if ext == ".txt":
            entries = []
            with open(path, "r", encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    text = line.strip()
                    if text and not text.startswith("#"):
                        entries.append((f"{path}:{n}", text))
            return entries
        if ext == ".toml":
            import toml

            with open(path, "r", encoding="utf-8") as f:
                data = toml.load(f)
            base = data.get("prompt")
            if not isinstance(base, dict) or not isinstance(base.get("subset"), list):
                raise UserError(f"{path}: needs a [prompt] table with [[prompt.subset]] entries (kohya's format)")
            unknown = sorted(set(data) - {"prompt"})
            if unknown:
                raise UserError(f"{path}: unknown table(s) {', '.join(unknown)} (only [prompt])")
            defaults = {k: v for k, v in base.items() if k != "subset"}
            entries = []
            for i, subset in enumerate(base["subset"]):
                if not isinstance(subset, dict):
                    raise UserError(f"{path}: prompt.subset {i + 1} is not a table")
                entries.append((f"{path}: prompt.subset {i + 1}", {**defaults, **subset}))
            return entries
        if ext == ".json":
            with open(path, "r", encoding="utf-8") as f:
                data = json.load(f)
            if not isinstance(data, list):
                raise UserError(f"{path}: needs a JSON list of prompts (strings or objects)")
            return [(f"{path}: entry {i + 1}", entry) for i, entry in enumerate(data)]
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason})") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: cannot parse JSON: line {e.lineno}: {e.msg}") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e})") from None
    except Exception as e:  # toml.TomlDecodeError
        if type(e).__name__ == "TomlDecodeError":
            raise UserError(f"{path}: cannot parse TOML: {e}") from None
        raise
    raise UserError(f"{path}: sample prompts must be a .txt, .toml or .json file")


def _check_prompt_dict(d: dict, where: str, default_sampler: str) -> dict:
    from library.sdxl_schedulers import check_sampler_name, get_kohya_scheduler

    for key in d:
        if key in OTHER_MODEL_KEYS:
            raise UserError(f"{where}: {OTHER_MODEL_KEYS[key]} / '{key}' is not used by SDXL sampling "
                            "(not implemented in this port)")
        if key not in PROMPT_KEYS:
            raise UserError(f"{where}: unknown key '{key}' (keys: {', '.join(PROMPT_KEYS)})")
    for key in ("prompt", "negative_prompt", "sample_sampler"):
        if key in d and not isinstance(d[key], str) and not (key == "negative_prompt" and d[key] is None):
            raise UserError(f"{where}: {key} must be a string, got {d[key]!r}")
    for key, low, high in (("width", 1, None), ("height", 1, None), ("seed", 0, None), ("sample_steps", 1, 1000)):
        if key in d:
            v = d[key]
            if isinstance(v, bool) or not isinstance(v, int) or v < low or (high is not None and v > high):
                rng = f"{low}..{high}" if high is not None else f">= {low}"
                raise UserError(f"{where}: {key} must be an integer {rng}, got {v!r}")
    if "scale" in d and (isinstance(d["scale"], bool) or not isinstance(d["scale"], (int, float))):
        raise UserError(f"{where}: scale must be a number, got {d['scale']!r}")
    for key in ("prompt", "negative_prompt"):  # sample prompts are always weighted: a bad "(x:1.2.3)" now
        if d.get(key):
            try:
                parse_prompt_attention(d[key])
            except ValueError as e:
                raise UserError(f"{where}: {key}: {e}") from None
    sampler = check_sampler_name(d.get("sample_sampler", default_sampler).strip(),
                                 f"{where}: sampler" if "sample_sampler" in d else "--sample_sampler")
    try:  # the sampler's own limits on the step count (pndm's Runge-Kutta warm-up needs 4), now, not mid-run
        get_kohya_scheduler(sampler).set_timesteps(d.get("sample_steps", DEFAULT_STEPS))
    except UserError as e:
        raise UserError(f"{where}: {e}") from None
    return d


def load_prompts(path: str, default_sampler: str = "ddim", pixel_multiple: Optional[int] = None) -> List[Dict]:
    """kohya's ``load_prompts``: a list of prompt dicts, each with ``enum`` (its position). Every entry is
    checked (UserError naming the file and line/entry); with ``pixel_multiple``, also that the rounded
    width/height fit the model."""
    prompts = []
    for i, (where, entry) in enumerate(_read_prompt_entries(path)):
        if isinstance(entry, str):
            entry = line_to_prompt_dict(entry, where)
        elif not isinstance(entry, dict):
            raise UserError(f"{where}: a prompt must be a string or an object, got {type(entry).__name__}")
        d = _check_prompt_dict(dict(entry), where, default_sampler)
        if pixel_multiple:
            for key, default in (("width", DEFAULT_WIDTH), ("height", DEFAULT_HEIGHT)):
                v = round_size(d.get(key, default))
                if v % pixel_multiple:
                    raise UserError(f"{where}: {key} {v} is not a multiple of {pixel_multiple}, which this model "
                                    "needs (VAE and U-Net downsampling)")
        d["enum"] = i
        prompts.append(d)
    if not prompts:
        raise UserError(f"{path}: no prompts in the sample prompts file")
    return prompts


def round_size(v: int) -> int:
    """kohya: round down to a multiple of 8, at least 64."""
    return max(64, v - v % 8)


# ---------------------------------------------------------------------------------------------
# when


def check_sample_args(args):
    """At start (before ``output_name`` gets its default): kohya's disabling of <= 0 intervals, the sampler
    name, and the prompts file (exists, parses, every option known) when sampling is asked for."""
    from library.sdxl_schedulers import check_sampler_name

    for name in ("sample_every_n_epochs", "sample_every_n_steps"):
        v = getattr(args, name, None)
        if v is not None and v <= 0:
            logger.warning("--%s %d <= 0: sampling by this interval is disabled (as kohya)", name, v)
            setattr(args, name, None)
    args.sample_sampler = check_sampler_name(args.sample_sampler, "--sample_sampler")
    args._sample_name_prefix = "" if args.output_name is None else args.output_name + "_"
    wanted = [f"--{n}" for n in SAMPLE_ARGS if getattr(args, n, None)]
    if args.sample_prompts is None:
        if wanted:
            raise UserError(f"{', '.join(wanted)} needs --sample_prompts (a .txt, .toml or .json prompt file)")
        return
    load_prompts(args.sample_prompts, args.sample_sampler)
    if not wanted:
        logger.warning("--sample_prompts without --sample_every_n_steps/--sample_every_n_epochs/--sample_at_first: "
                       "no samples will be generated (as kohya)")


def should_sample(args, epoch: Optional[int], steps: int) -> bool:
    """kohya's conditions (``sample_images_common``): ``epoch`` is None after an update step, the epoch number
    at an epoch end, 0 before training."""
    if getattr(args, "sample_prompts", None) is None:
        return False
    if steps == 0:
        return bool(args.sample_at_first)
    if args.sample_every_n_steps is None and args.sample_every_n_epochs is None:
        return False
    if args.sample_every_n_epochs is not None:  # sample_every_n_steps is ignored
        return epoch is not None and epoch % args.sample_every_n_epochs == 0
    return epoch is None and steps % args.sample_every_n_steps == 0


def sample_image_name(prefix: str, epoch: Optional[int], steps: int, index: int, seed: Optional[int],
                      timestamp: Optional[str] = None) -> str:
    """kohya's file name without ``.png``: ``<output_name>_<e{epoch:06d}|{steps:06d}>_<i:02d>_<ts>[_<seed>]``."""
    ts = timestamp or time.strftime("%Y%m%d%H%M%S", time.localtime())
    num_suffix = f"e{epoch:06d}" if epoch is not None else f"{steps:06d}"
    seed_suffix = "" if seed is None else f"_{seed}"
    return f"{prefix}{num_suffix}_{index:02d}_{ts}{seed_suffix}"


# ---------------------------------------------------------------------------------------------
# generation


@contextlib.contextmanager
def eval_mode(*roots):
    """Every cell under ``roots`` in eval mode inside; each cell's own training flag and phase restored after."""
    saved = []
    for root in roots:
        for _, cell in root.cells_and_names():
            saved.append((cell, cell.training, cell._phase))
    try:
        for root in roots:
            root.set_train(False)
        yield
    finally:
        for cell, training, phase in saved:
            cell.add_flags(training=training)
            cell._phase = phase


class TrainingSampler:
    """Samples with the models being trained at kohya's points; ``sample(epoch, steps)`` does nothing when
    ``should_sample`` says no."""

    def __init__(self, args, text_encoders, vae, unet, rank: int = 0, world_size: int = 1):
        self.args = args
        self.rank, self.world_size = int(rank), int(world_size)  # data parallel: prompts split as kohya
        self.text_encoders, self.vae, self.unet = list(text_encoders), vae, unet
        self.enabled = args.sample_prompts is not None and any(getattr(args, n, None) for n in SAMPLE_ARGS)
        self.gen = None
        self.pixel_multiple = None
        if self.enabled:  # sizes against this model, before training starts
            self.pixel_multiple = (2 ** (len(vae.config.block_out_channels) - 1)
                                   * 2 ** (len(unet.config.channel_mult) - 1))
            load_prompts(args.sample_prompts, args.sample_sampler, self.pixel_multiple)

    def _generator(self):
        if self.gen is None:
            from library.sdxl_pipeline import Generator

            te1, te2 = self.text_encoders
            # kohya's SDXL sample pipeline always weights its prompts ((word:1.2), with or without
            # --weighted_captions) and tokenises them to --max_token_length
            self.gen = Generator(te1, te2, self.vae, self.unet, "fp32", "fp32", prepare_models=False,
                                 prompt_weighting=True, max_token_length=self.args.max_token_length)
        return self.gen

    def sample(self, epoch: Optional[int], steps: int) -> List[str]:
        args = self.args
        if not self.enabled or not should_sample(args, epoch, steps):
            return []
        logger.info("generating sample images at step %d", steps)
        try:  # re-read every time as kohya (the file may be edited during training); a broken file skips
            prompts = load_prompts(args.sample_prompts, args.sample_sampler, self.pixel_multiple)
        except UserError as e:
            logger.error("no sample images at step %d: %s", steps, e)
            return []
        prompts = prompts[self.rank::self.world_size]  # kohya: prompts[i::num_processes] on process i
        save_dir = os.path.join(getattr(args, "_sample_output_dir", None) or args.output_dir, "sample")
        os.makedirs(save_dir, exist_ok=True)
        paths = []
        t0 = time.perf_counter()
        from tqdm import tqdm

        with eval_mode(*self.text_encoders, self.vae, self.unet):
            gen = self._generator()
            for prompt_dict in tqdm(prompts, desc="sample images", unit="image", leave=False, dynamic_ncols=True):
                paths.append(self._sample_one(gen, save_dir, prompt_dict, epoch, steps))
        logger.info("%d sample images in %.1f s", len(paths), time.perf_counter() - t0)
        return paths

    def _sample_one(self, gen, save_dir, d, epoch, steps):
        import numpy as np

        from library.sdxl_pipeline import save_png
        from library.sdxl_schedulers import get_kohya_scheduler

        args = self.args
        prompt = d.get("prompt", "")
        negative_prompt = d.get("negative_prompt") or ""
        sample_steps = d.get("sample_steps", DEFAULT_STEPS)
        width = round_size(d.get("width", DEFAULT_WIDTH))
        height = round_size(d.get("height", DEFAULT_HEIGHT))
        scale = float(d.get("scale", DEFAULT_SCALE))
        seed = d.get("seed")
        sampler = d.get("sample_sampler", args.sample_sampler).strip().lower()
        logger.info("prompt: %s | negative: %s | %dx%d, %d steps, scale %g, %s, seed %s", prompt, negative_prompt,
                    width, height, sample_steps, scale, sampler, seed)
        # its own generator: kohya reseeds torch's global RNG and restores it; here nothing global is touched
        used_seed = seed if seed is not None else int(np.random.SeedSequence().entropy % (2 ** 31))
        rng = np.random.default_rng(used_seed)
        # kohya's SDXL pipeline: original = target = (height, width), crop (0, 0); the prompt to both encoders
        t0 = time.perf_counter()
        context, y = gen.conditioning(prompt, prompt, negative_prompt, scale, width, height)
        noise = rng.standard_normal((1,) + gen.latent_shape(width, height), dtype=np.float32)
        scheduler = get_kohya_scheduler(sampler, args.v_parameterization)
        t1 = time.perf_counter()
        latents = gen.sample(noise, scheduler, sample_steps, context, y, scale, rng)
        t2 = time.perf_counter()
        pixels = gen.decode(latents)
        t3 = time.perf_counter()
        prefix = getattr(args, "_sample_name_prefix", None)
        if prefix is None:
            prefix = "" if args.output_name is None else args.output_name + "_"
        name = sample_image_name(prefix, epoch, steps, d["enum"], seed)
        info = {"prompt": prompt, "negative_prompt": negative_prompt, "seed": used_seed,
                "steps": sample_steps, "scale": scale, "sampler": sampler, "width": width, "height": height,
                "epoch": "" if epoch is None else epoch, "step": steps,
                "model": os.path.basename(os.path.normpath(args.pretrained_model_name_or_path)),
                "output_name": args.output_name or "", "v_parameterization": bool(args.v_parameterization)}
        path = save_png(save_dir, name, pixels, info)
        logger.info("saved %s (text encoders %.1f s, denoising %.1f s, VAE %.1f s; the first call of each "
                    "size compiles)", path, t1 - t0, t2 - t1, t3 - t2)
        return path
