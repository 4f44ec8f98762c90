"""Our own code vs the packages that could do the same job: CLIP tokenisation (library/clip_tokenizer.py
vs transformers' CLIPTokenizer / CLIPTokenizerFast) and safetensors I/O (library/safetensors_io.py and
library/lora_file.py vs the safetensors package), seconds and peak RSS, results identical or not.

    python bench/bench_dependencies.py --file /tmp/sdxl_full.safetensors --generate
    python bench/bench_dependencies.py --skip_checkpoint          # tokenizers and the LoRA-sized file only

Every case runs in its own process (``run_worker``), one after the other, so each peak RSS (VmHWM) is that
case's alone. Nothing is downloaded: transformers reads the bundled vocabulary, written in its layout
(``write_hf_tokenizer_files``) into a temporary folder, with HF_HUB_OFFLINE=1.

Tokenizers: ``--captions`` kohya-style captions (comma-separated tags, sentences, weights, non-ASCII text,
"!", made-up names; some longer than 75 tokens), each tokenised by both SDXL tokenizers the way the dataset
does (``tokenizer(caption, padding="max_length", truncation=True, max_length=77, return_tensors="np")``,
library/token_chunking.py). "import s" is the import of the tokenizer module with numpy already loaded,
"build s" making both tokenizers, "run s" the captions; the ids of every case are compared with ours.

Full-size checkpoint (``--file``, fp16): every tensor read in file order, the trainer's way
(``safetensors_io.open_weights(path).get(key)``, what ``sdxl_checkpoint.stream_into`` calls) vs
``safetensors.numpy.load_file`` (the whole dict) and ``safe_open(framework="numpy").get_tensor`` tensor by
tensor (mmap and pread backends). The file is read once before the cases (page cache warm for all); each
tensor is dropped after a strided fingerprint, and the fingerprints are compared with ours. Seconds are the
median of ``--read_repeat`` rounds (``load_file``, which holds the whole file, runs once).

LoRA-sized file (``--lora_mb``, fp16, kohya key names, ss_* metadata with a large non-ASCII tag
frequency): written with ``safetensors_io.write_safetensors`` (our streaming writer, used for checkpoints),
``lora_file.save_state_dict_file`` (the LoRA saver: the package plus a header rewrite keeping the metadata
order) and ``safetensors.numpy.save_file``, each once more in a new process (bytes reproducible or not); and
whether the package reads a BF16 tensor; read back with ``lora_file.load_state_dict_file`` and
``safetensors.numpy.load_file``. "extra GB" is the peak RSS over the RSS just before the write/read (the
tensors in memory); seconds are the median of ``--repeat`` runs.
"""
import argparse
import hashlib
import json
import os
import random
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench_common import ensure_sdxl_file, fmt, peak_rss_gb, rss_gb, run_worker  # noqa: E402

TOKENIZER_CASES = ("ours", "hf-slow", "hf-fast", "hf-slow+torch")
READ_CASES = ("ours-stream", "pkg-load_file", "pkg-safe_open-mmap", "pkg-safe_open-pread")
WRITE_CASES = ("ours-stream", "ours-lora", "pkg-save_file")
LORA_READ_CASES = ("ours-lora", "pkg-load_file")


# ---------------------------------------------------------------------------------------------------------
# inputs


_TAGS = (
    "1girl 1boy solo multiple_girls long_hair short_hair looking_at_viewer smile open_mouth blue_eyes "
    "brown_hair black_hair blonde_hair red_eyes green_eyes simple_background white_background outdoors "
    "indoors sky cloud day night tree flower water beach city street building window table chair "
    "holding sitting standing upper_body full_body cowboy_shot from_side from_above dress skirt shirt "
    "jacket hat glasses gloves boots school_uniform hair_ornament hair_between_eyes bangs blush "
    "closed_eyes jewelry earrings necklace bow ribbon twintails ponytail braid animal_ears cat_ears "
    "tail wings sword weapon food cup book umbrella rain snow sunset sunlight shadow depth_of_field "
    "blurry_background bokeh masterpiece best_quality highres absurdres official_art scenery landscape "
    "mountain river forest grass sand ocean wave reflection lens_flare light_particles cherry_blossoms "
    "autumn_leaves 2020s 1990s_(style) retro_artstyle monochrome greyscale sketch watercolor_(medium) "
    "oil_painting_(medium) photorealistic realistic portrait close-up dutch_angle wide_shot"
).split()
_WEIRD = ("café", "naïve", "日本語", "東京タワー", "Ünïcödé", "Ελληνικά", "русский текст", "emoji \U0001F600\U0001F308",
          "&amp; html &lt;tag&gt;", "fish & chips", "don't", "it's", "we'll", "wow!!", "hello!", "(masterpiece:1.2)",
          "[sketch]", "{best quality}", "score_9, score_8_up", "\u00a0non-breaking\u00a0space", "tab\tand\nnewline",
          "ＦＵＬＬＷＩＤＴＨ", "ﬁ ligature", "über-cool", "<|endoftext|>", "C:\\path\\to\\file.png", "v1.5 / 2.0",
          "100%", "#hashtag @user", "mojibake: â€™s")
_NOUNS = ("a photo of a cat sitting on a wooden table in the warm afternoon sunlight",
          "an oil painting of a lighthouse on a rocky coast during a storm, dramatic waves",
          "close-up portrait of an old man with a grey beard and deep wrinkles, studio lighting",
          "a futuristic city skyline at night with neon signs reflected in the wet street",
          "two children playing football in a park while their dog watches from the grass",
          "a bowl of ramen with a soft-boiled egg, spring onions and slices of pork, top view",
          "watercolor illustration of a fox in a snowy forest, soft pastel colours",
          "the interior of a cozy library with tall shelves, a fireplace and a reading chair")


def make_captions(n, seed=0):
    """``n`` kohya-style captions, deterministic for ``seed``."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    out = []
    for i in range(n):
        kind = rng.random()
        parts = []
        if kind < 0.55:  # tag list, a fifth of them long enough to pass 75 tokens
            count = rng.randint(35, 60) if rng.random() < 0.2 else rng.randint(5, 25)
            parts = [rng.choice(_TAGS).replace("_", " ") if rng.random() < 0.7 else rng.choice(_TAGS)
                     for _ in range(count)]
            if rng.random() < 0.3:
                parts.insert(rng.randint(0, len(parts)), "".join(rng.choice(letters) for _ in range(rng.randint(4, 11))))
            if rng.random() < 0.25:
                parts.insert(rng.randint(0, len(parts)), rng.choice(_WEIRD))
            text = ", ".join(parts)
        elif kind < 0.9:  # sentences, sometimes with tags behind
            text = rng.choice(_NOUNS)
            if rng.random() < 0.5:
                text += ". " + rng.choice(_NOUNS).capitalize() + "."
            if rng.random() < 0.4:
                text += ", " + ", ".join(rng.choice(_TAGS) for _ in range(rng.randint(3, 30)))
            if rng.random() < 0.2:
                text += " " + rng.choice(_WEIRD)
        else:  # the odd ones
            text = " ".join(rng.choice(_WEIRD) for _ in range(rng.randint(1, 6)))
            if rng.random() < 0.5:
                text = rng.choice(_TAGS) + ", " + text + "  " + rng.choice(_NOUNS).upper()
        out.append(text)
    return out


def make_lora(target_mb, seed=0):
    """(tensors, metadata): a kohya-named fp16 LoRA state dict of about ``target_mb`` MB and ss_* metadata."""
    import numpy as np

    rng = np.random.default_rng(seed)
    dims = ((640, 640), (1280, 1280), (2048, 640), (2048, 1280), (1280, 5120), (5120, 1280), (768, 768),
            (1280, 10240), (640, 2560))
    rank = 16
    tensors = {}
    total = 0
    i = 0
    while total < target_mb * 1e6:
        in_f, out_f = dims[i % len(dims)]
        key = f"lora_unet_output_blocks_{i // 60}_1_transformer_blocks_{i % 60}_attn{1 + i % 2}_to_{'qkv'[i % 3]}"
        down = (rng.standard_normal((rank, in_f), dtype=np.float32) * 0.01).astype(np.float16)
        up = (rng.standard_normal((out_f, rank), dtype=np.float32) * 0.01).astype(np.float16)
        tensors[key + ".lora_down.weight"] = down
        tensors[key + ".lora_up.weight"] = up
        tensors[key + ".alpha"] = np.array(rank, np.float16)
        total += down.nbytes + up.nbytes + 2
        i += 1
    tag_rng = random.Random(seed)
    freq = {"10_subject": {t: tag_rng.randint(1, 500) for t in list(_TAGS) + [f"tag_{k}" for k in range(3000)]
                           + ["日本語タグ", "café"]}}
    metadata = {f"ss_key_{k:02d}": f"value {k}" for k in range(30)}
    metadata.update(ss_network_module="networks.lora", ss_network_dim=str(rank), ss_network_alpha=str(rank),
                    ss_tag_frequency=json.dumps(freq, ensure_ascii=False),
                    ss_output_name="bench_lora", modelspec__title="bench lora")
    return tensors, metadata


def fingerprint(a):
    """A cheap, exact-equality fingerprint of an array: dtype, shape and a strided float64 sum."""
    import numpy as np

    flat = a.reshape(-1)
    return [str(a.dtype), list(a.shape), float(flat[::997].astype(np.float64).sum()) if flat.size else 0.0]


def hf_env(torch=False):
    """Offline; transformers without torch (USE_TORCH=0: the runtime install has none) unless ``torch``."""
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TRANSFORMERS_VERBOSITY="error",
               TOKENIZERS_PARALLELISM="true")
    if not torch:
        env.update(USE_TORCH="0", USE_TF="0", USE_FLAX="0")
    return env


# ---------------------------------------------------------------------------------------------------------
# workers


def worker_tokenize(args):
    import numpy as np

    captions = make_captions(args.captions, args.seed)
    t0 = time.perf_counter()
    if args.case == "ours":
        from library.clip_tokenizer import load_tokenizers
        t_import = time.perf_counter() - t0
        t0 = time.perf_counter()
        toks = load_tokenizers()
    else:
        import transformers
        cls = transformers.CLIPTokenizerFast if args.case == "hf-fast" else transformers.CLIPTokenizer
        t_import = time.perf_counter() - t0
        t0 = time.perf_counter()
        toks = [cls.from_pretrained(os.path.join(args.out, d)) for d in ("tok1", "tok2")]
    t_build = time.perf_counter() - t0
    torch_loaded = "torch" in sys.modules
    assert toks[0].pad_token_id == 49407 and toks[1].pad_token_id == 0, (toks[0].pad_token_id, toks[1].pad_token_id)
    ids = np.zeros((len(captions), 2, args.max_length), np.int32)
    t0 = time.perf_counter()
    for i, caption in enumerate(captions):
        for j, tok in enumerate(toks):
            ids[i, j] = tok(caption, padding="max_length", truncation=True, max_length=args.max_length,
                            return_tensors="np")["input_ids"][0]
    t_run = time.perf_counter() - t0
    np.save(os.path.join(args.out, f"ids_{args.case}.npy"), ids)
    print("RESULT " + json.dumps(dict(import_s=t_import, build_s=t_build, run_s=t_run, peak_gb=peak_rss_gb(),
                                      torch_imported=torch_loaded, captions=len(captions))))


def worker_read(args):
    import numpy as np

    from library.device_utils import reset_peak_rss
    fps = {}
    if args.case == "ours-stream":
        from library import safetensors_io as sio
    else:
        import safetensors.numpy  # noqa: F401
        from safetensors import safe_open
    base = rss_gb()
    reset_peak_rss()
    t0 = time.perf_counter()
    if args.case == "ours-stream":
        with sio.open_weights(args.file) as reader:
            for key in reader.keys():
                a = reader.get(key)
                fps[key] = fingerprint(a)
                del a
    elif args.case == "pkg-load_file":
        tensors = safetensors.numpy.load_file(args.file)
        for key, a in tensors.items():
            fps[key] = fingerprint(a)
        del tensors, a
    else:
        backend = args.case.rsplit("-", 1)[1]
        with safe_open(args.file, framework="numpy", backend=backend) as f:
            for key in f.offset_keys():
                a = f.get_tensor(key)
                fps[key] = fingerprint(a)
                del a
    seconds = time.perf_counter() - t0
    peak = peak_rss_gb()
    with open(os.path.join(args.out, f"fp_{args.case}.json"), "w") as f:
        json.dump(fps, f)
    print("RESULT " + json.dumps(dict(seconds=seconds, base_gb=base, peak_gb=peak, tensors=len(fps),
                                      gb_read=os.path.getsize(args.file) / 1024 ** 3)))


def _median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2]


def worker_write(args):
    from library.device_utils import reset_peak_rss
    tensors, metadata = make_lora(args.lora_mb, args.seed)
    if args.case == "ours-stream":
        from library import safetensors_io as sio

        entries = [(k, "F16", a.shape, lambda a=a: a) for k, a in tensors.items()]
        write = lambda path: sio.write_safetensors(path, entries, metadata)  # noqa: E731
    elif args.case == "ours-lora":
        from library.lora_file import save_state_dict_file

        write = lambda path: save_state_dict_file(path, tensors, metadata)  # noqa: E731
    else:
        import safetensors.numpy

        write = lambda path: safetensors.numpy.save_file(tensors, path, metadata=metadata)  # noqa: E731
    path = os.path.join(args.out, f"lora_{args.case}.safetensors")
    base = rss_gb()
    reset_peak_rss()
    times = []
    for _ in range(args.repeat):
        if os.path.exists(path):
            os.remove(path)
        t0 = time.perf_counter()
        write(path)
        times.append(time.perf_counter() - t0)
    peak = peak_rss_gb()
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    print("RESULT " + json.dumps(dict(seconds=_median(times), base_gb=base, peak_gb=peak, extra_gb=peak - base,
                                      tensors=len(tensors), mb=os.path.getsize(path) / 1e6, sha256=digest)))


def worker_lora_read(args):
    from library.device_utils import reset_peak_rss
    if args.case == "ours-lora":
        from library.lora_file import load_state_dict_file

        def read(path):
            return load_state_dict_file(path)[:2]
    else:
        import safetensors.numpy
        from safetensors import safe_open

        def read(path):
            with safe_open(path, framework="numpy") as f:
                metadata = f.metadata()
            return safetensors.numpy.load_file(path), metadata
    path = os.path.join(args.out, "lora_pkg-save_file.safetensors")
    base = rss_gb()
    reset_peak_rss()
    times = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        tensors, metadata = read(path)
        times.append(time.perf_counter() - t0)
        if _ + 1 < args.repeat:
            del tensors, metadata
    peak = peak_rss_gb()
    fps = {k: fingerprint(a) for k, a in tensors.items()}
    same = fps == {k: fingerprint(a) for k, a in make_lora(args.lora_mb, args.seed)[0].items()}
    print("RESULT " + json.dumps(dict(seconds=_median(times), base_gb=base, peak_gb=peak, extra_gb=peak - base,
                                      tensors=len(tensors), same=same, metadata_keys=len(metadata))))


# ---------------------------------------------------------------------------------------------------------
# driver


def _worker_args(args, kind, case):
    return ["--worker", kind, "--case", case, "--out", args.out, "--file", args.file or "",
            "--captions", str(args.captions), "--max_length", str(args.max_length), "--seed", str(args.seed),
            "--lora_mb", str(args.lora_mb), "--repeat", str(args.repeat),
            "--read_repeat", str(args.read_repeat)]


def _warm_page_cache(path):
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(64 << 20)
        while f.readinto(buf):
            pass


def bench_tokenizers(args, results):
    import numpy as np

    from library.clip_tokenizer import EOS_TOKEN, SDXL_TOKENIZER2_PAD_TOKEN, write_hf_tokenizer_files

    write_hf_tokenizer_files(os.path.join(args.out, "tok1"), pad_token=EOS_TOKEN)
    write_hf_tokenizer_files(os.path.join(args.out, "tok2"), pad_token=SDXL_TOKENIZER2_PAD_TOKEN)
    captions = make_captions(args.captions, args.seed)
    print(f"\nTokenizers: {len(captions)} captions x 2 SDXL tokenizers, max_length {args.max_length}, per caption "
          "as the dataset calls them; hf-* without torch (USE_TORCH=0) unless +torch")
    print(f"{'case':<14} {'import s':>9} {'build s':>8} {'run s':>7} {'ms/caption':>11} {'peak GB':>8} "
          f"{'captions differing':>19}  torch imported")
    ours = None
    for case in TOKENIZER_CASES:
        r = run_worker(__file__, _worker_args(args, "tokenize", case), env=hf_env(torch=case.endswith("+torch")))
        path = os.path.join(args.out, f"ids_{case}.npy")
        if "error" not in r:
            ids = np.load(path)
            if case == "ours":
                ours = ids
                long_ = int(np.sum(ids[:, 1, -1] != 0))  # tokenizer 2 pads with 0: no pad left
            elif ours is not None:
                bad = np.nonzero(np.any(ids != ours, axis=(1, 2)))[0]
                r["mismatches"] = int(bad.size)
                r["mismatches_tok1"] = int(np.any(ids[:, 0] != ours[:, 0], axis=1).sum())
                r["mismatches_tok2"] = int(np.any(ids[:, 1] != ours[:, 1], axis=1).sum())
                if bad.size:
                    k = int(bad[0])
                    j = 0 if np.any(ids[k, 0] != ours[k, 0]) else 1
                    d = int(np.nonzero(ids[k, j] != ours[k, j])[0][0])
                    r["example"] = dict(caption=captions[k], tokenizer=j + 1, first_diff_pos=d,
                                        ours=ours[k, j, max(0, d - 3):d + 5].tolist(),
                                        theirs=ids[k, j, max(0, d - 3):d + 5].tolist())
        results["tokenizer"][case] = r
        mism = "-" if case == "ours" or "mismatches" not in r else \
            f"{r['mismatches']} ({r['mismatches_tok1']}+{r['mismatches_tok2']})"
        per = r["run_s"] / len(captions) * 1e3 if "run_s" in r else None
        print(f"{case:<14} {fmt(r.get('import_s')):>9} {fmt(r.get('build_s')):>8} {fmt(r.get('run_s'), '.1f'):>7} "
              f"{fmt(per, '.3f'):>11} {fmt(r.get('peak_gb')):>8} {mism:>19}  {r.get('torch_imported', '-')}"
              + (f"  {r['error']}" if "error" in r else ""))
    if ours is not None:
        print(f"(captions reaching the {args.max_length}-id limit, i.e. truncated or exactly full: {long_})")
    for case, r in results["tokenizer"].items():
        if r.get("example"):
            print(f"first differing caption for {case}: {json.dumps(r['example'], ensure_ascii=False)}")


def bench_read(args, results):
    print(f"\nFull-size checkpoint read ({args.file}, {os.path.getsize(args.file) / 1024 ** 3:.2f} GB), every tensor "
          f"in file order, page cache warm; median of {args.read_repeat} rounds (pkg-load_file: one)")
    ours = None
    t0 = time.time()
    _warm_page_cache(args.file)
    print(f"(warm-up read {time.time() - t0:.1f} s)")
    runs = {case: [] for case in READ_CASES}
    for round_ in range(args.read_repeat):
        for case in READ_CASES:
            if case == "pkg-load_file" and round_:
                continue  # holds the whole file (twice over): once is enough
            r = run_worker(__file__, _worker_args(args, "read", case))
            if "error" not in r:
                with open(os.path.join(args.out, f"fp_{case}.json")) as f:
                    fps = json.load(f)
                if case == "ours-stream":
                    ours = fps
                r["same"] = fps == ours
            runs[case].append(r)
    print(f"{'case':<20} {'seconds':>8} {'all runs':>18} {'GB/s':>6} {'peak GB':>8} {'tensors':>8}  same as ours")
    for case in READ_CASES:
        ok = [r for r in runs[case] if "error" not in r]
        r = dict(ok[0]) if ok else runs[case][0]
        if ok:
            r.update(seconds=_median([x["seconds"] for x in ok]), all_seconds=[x["seconds"] for x in ok],
                     peak_gb=max(x["peak_gb"] for x in ok), same=all(x["same"] for x in ok))
        results["read"][case] = r
        gbs = r["gb_read"] / r["seconds"] if "seconds" in r else None
        every = "/".join(f"{x:.2f}" for x in r.get("all_seconds", []))
        print(f"{case:<20} {fmt(r.get('seconds')):>8} {every:>18} {fmt(gbs):>6} "
              f"{fmt(r.get('peak_gb')):>8} {r.get('tensors', '-'):>8}  {r.get('same', '-')}"
              + (f"  {r['error']}" if "error" in r else ""))


def _package_reads_bf16(folder):
    """True, or the error the package raises, for a one-tensor BF16 file written by ours."""
    import numpy as np
    import safetensors.numpy

    from library import safetensors_io as sio
    path = os.path.join(folder, "bf16.safetensors")
    sio.write_safetensors(path, [("w", "BF16", (2,), lambda: np.array([1.0, 2.0], np.float32))])
    try:
        safetensors.numpy.load_file(path)
        return True
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {e}"


def bench_lora(args, results):
    from library.lora_file import parse_safetensors

    print(f"\nLoRA-sized file ({args.lora_mb} MB fp16 + metadata), median of {args.repeat}")
    print(f"{'write':<20} {'seconds':>8} {'MB':>7} {'base GB':>8} {'extra GB':>9} {'tensors':>8}  "
          "bytes = package's  content = package's")
    for case in WRITE_CASES[::-1]:  # the package's file first: the others compare with it
        r = run_worker(__file__, _worker_args(args, "write", case))
        results["write"][case] = r
    ref = results["write"]["pkg-save_file"]
    ref_path = os.path.join(args.out, "lora_pkg-save_file.safetensors")
    # the same saves in new processes: are the bytes reproducible (the package orders metadata by a hash map)?
    again = {case: run_worker(__file__, _worker_args(args, "write", case)) for case in WRITE_CASES}
    third = run_worker(__file__, _worker_args(args, "write", "pkg-save_file"))
    reproducible = {case: r.get("sha256") is not None and r.get("sha256") == results["write"][case].get("sha256")
                    for case, r in again.items()}
    reproducible["pkg-save_file"] &= third.get("sha256") == again["pkg-save_file"].get("sha256")
    with open(ref_path, "rb") as f:
        ref_content = parse_safetensors(f.read(), ref_path)
    for case in WRITE_CASES:
        r = results["write"][case]
        if "error" not in r and "error" not in ref:
            path = os.path.join(args.out, f"lora_{case}.safetensors")
            with open(path, "rb") as f:
                content = parse_safetensors(f.read(), path)
            r["same_bytes"] = r["sha256"] == ref["sha256"]
            r["same_content"] = all(
                content[i].keys() == ref_content[i].keys() for i in range(3)) and all(
                (content[0][k] == ref_content[0][k]).all() for k in ref_content[0]) and content[1] == ref_content[1]
        print(f"{case:<20} {fmt(r.get('seconds'), '.3f'):>8} {fmt(r.get('mb'), '.1f'):>7} {fmt(r.get('base_gb')):>8} "
              f"{fmt(r.get('extra_gb'), '.3f'):>9} {r.get('tensors', '-'):>8}  {str(r.get('same_bytes', '-')):>15}  "
              f"{str(r.get('same_content', '-')):>17}" + (f"  {r['error']}" if "error" in r else ""))
    print("same bytes when written again in new processes: "
          + ", ".join(f"{case} {ok}" for case, ok in reproducible.items()))
    results["write_reproducible"] = reproducible
    results["package_reads_bf16"] = _package_reads_bf16(args.out)
    print(f"safetensors.numpy reads a BF16 tensor (kohya saves bf16 LoRAs): {results['package_reads_bf16']}")
    print(f"{'read':<20} {'seconds':>8} {'':>7} {'base GB':>8} {'extra GB':>9} {'tensors':>8}  same tensors")
    for case in LORA_READ_CASES:
        r = run_worker(__file__, _worker_args(args, "lora_read", case))
        results["lora_read"][case] = r
        print(f"{case:<20} {fmt(r.get('seconds'), '.3f'):>8} {'':>7} {fmt(r.get('base_gb')):>8} "
              f"{fmt(r.get('extra_gb'), '.3f'):>9} {r.get('tensors', '-'):>8}  {r.get('same', '-')}"
              + (f"  {r['error']}" if "error" in r else ""))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--file", default=None, help="full-size SDXL checkpoint (.safetensors)")
    parser.add_argument("--generate", action="store_true", help="write a random SDXL-shaped fp16 file if missing")
    parser.add_argument("--skip_checkpoint", action="store_true", help="no full-size checkpoint read")
    parser.add_argument("--skip_tokenizers", action="store_true")
    parser.add_argument("--skip_lora", action="store_true")
    parser.add_argument("--captions", type=int, default=20000)
    parser.add_argument("--max_length", type=int, default=77)
    parser.add_argument("--lora_mb", type=float, default=100)
    parser.add_argument("--repeat", type=int, default=5, help="LoRA-sized writes/reads per case (median)")
    parser.add_argument("--read_repeat", type=int, default=3, help="rounds of the full-size reads (median)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--case", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        import library  # noqa: F401  (the project's environment, as the trainer sets it)
        import numpy  # noqa: F401  (loaded in every case before anything is timed)
        return {"tokenize": worker_tokenize, "read": worker_read, "write": worker_write,
                "lora_read": worker_lora_read}[args.worker](args)
    if not args.skip_checkpoint:
        if not args.file:
            parser.error("--file is required unless --skip_checkpoint")
        ensure_sdxl_file(args.file, args.generate, parser)
    results = {"tokenizer": {}, "read": {}, "write": {}, "lora_read": {}}
    args.out = tempfile.mkdtemp(prefix="bench_deps_")
    try:
        if not args.skip_tokenizers:
            bench_tokenizers(args, results)
        if not args.skip_checkpoint:
            bench_read(args, results)
        if not args.skip_lora:
            bench_lora(args, results)
    finally:
        shutil.rmtree(args.out, ignore_errors=True)
    print("RESULT " + json.dumps(results, ensure_ascii=False))


if __name__ == "__main__":
    main()
