"""Run on every rank by test_distributed under mlx.launch (`replies` alone gives the single-process reference): the
chat app's engine without the app. Rank 0 sends the turns of SCRIPT from a worker thread, as the app does, pressing "Esc"
(setting the stop event) after a turn's first `stop_after` pieces when given; the other ranks serve. Each rank
prints one JSON line when it is done; rank 0's holds the replies.

    mlx.launch --backend ring -n 2 -- tests/distributed_chat.py MODEL MODE
"""

from __future__ import annotations

import json
import sys
import threading

import qwen_mlx
from qwen_mlx.distributed.runtime import run_ranks
from tui.engine import ModelEngine

SCRIPT = [  # (message, think, stop after this many pieces or None)
    ("hello there", True, None),
    ("and again, briefly", False, None),
    ("stop me early", False, 3),
    ("one more", False, None),
]


def turn(engine: ModelEngine, text: str, think: bool, stop_after: int | None) -> dict:
    stop = threading.Event()
    pieces, reply = [], {}

    def work() -> None:
        for event in engine.send(text, think=think, stop=stop):
            if event.kind == "done":
                reply.update(finish=event.finish_reason, tokens=event.stats.generated_tokens)
                continue
            pieces.append([event.kind, event.text])
            if stop_after is not None and len(pieces) >= stop_after:
                stop.set()

    worker = threading.Thread(target=work)  # the app decodes on a worker thread too
    worker.start()
    worker.join()
    return {"pieces": pieces, **reply, "context": engine.context()[0]}


def replies(llm: qwen_mlx.LLM) -> list[dict]:
    engine = ModelEngine(llm, max_tokens=12, sampling_overrides={"temperature": 0.0})
    return [turn(engine, *step) for step in SCRIPT]


def main(model: str, mode: str) -> None:
    with run_ranks(model, mode) as llm:
        if llm is None:
            print(json.dumps({"served": True}), flush=True)
            return
        result = replies(llm)
    print(json.dumps({"replies": result}), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
