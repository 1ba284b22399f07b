"""`rlhf chat PATH`: a streaming interactive chat with any checkpoint, to look at the model.

Commands: /reset starts a new conversation, /exit (or Ctrl-D) quits.
"""

from __future__ import annotations

import argparse
import sys
from threading import Thread


def chat(
    path: str, max_new_tokens: int, temperature: float, system: str | None, trust_remote_code: bool
) -> None:
    from transformers import TextIteratorStreamer

    from rlhf.data import render_prompt
    from rlhf.models import load_causal_lm, load_tokenizer, resolve_device

    tokenizer = load_tokenizer(path, trust_remote_code)
    model = load_causal_lm(path, tokenizer, trust_remote_code=trust_remote_code).eval().to(resolve_device())
    history = [{"role": "system", "content": system}] if system else []
    print(f"chatting with {path} (/reset, /exit)")
    while True:
        try:
            text = input("you> ").strip()
        except EOFError:
            print()
            return
        if text in ("/exit", "/quit"):
            return
        if text == "/reset":
            history = history[:1] if system else []
            continue
        if not text:
            continue
        history.append({"role": "user", "content": text})
        inputs = tokenizer(render_prompt(tokenizer, history), return_tensors="pt", add_special_tokens=False)
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        options = {
            **{k: v.to(model.device) for k, v in inputs.items()},
            "max_new_tokens": max_new_tokens,
            "do_sample": temperature > 0,
            "temperature": temperature if temperature > 0 else None,
            "top_k": 0,
            "streamer": streamer,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        }
        failed: list[BaseException] = []
        worker = Thread(target=_generate, args=(model, options, failed))
        worker.start()
        print("model> ", end="", flush=True)
        reply = ""
        for piece in streamer:
            reply += piece
            print(piece, end="", flush=True)
        worker.join()
        print()
        if failed:
            raise failed[0]
        history.append({"role": "assistant", "content": reply.strip()})


def _generate(model, options: dict, failed: list[BaseException]) -> None:
    """`model.generate` in the streaming thread. An error (out of memory, past the model's context) ends the
    stream and is kept for the reader to raise; otherwise the reader would wait for the stream forever."""
    try:
        model.generate(**options)
    except BaseException as err:
        failed.append(err)
        options["streamer"].end()


def cli(argv: list[str] | None = None) -> int:
    from rlhf.cli import at_least, run_guarded

    parser = argparse.ArgumentParser(prog="rlhf chat", description="Chat with a checkpoint (streaming).")
    parser.add_argument("path")
    parser.add_argument("--max-new-tokens", type=at_least(1), default=128)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--system", help="Optional system message.")
    parser.add_argument("--trust-remote-code", action="store_true")
    args = parser.parse_args(argv)
    return run_guarded(
        lambda: chat(args.path, args.max_new_tokens, args.temperature, args.system, args.trust_remote_code)
    )


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
