"""archlab chat: talk to an instruction-tuned checkpoint (RustGPT's interactive mode).

On a terminal: prompt ``You: `` with line editing and history (arrows, Ctrl-A/E...) through
``readline`` where Python has it, answers streamed after ``Assistant: ``; ``exit``/``quit``,
end of input (Ctrl-D) or Ctrl-C end the session with exit code 0. When stdin is not a
terminal, every non-empty line is one question and each answer is printed on its own
``Assistant: ...`` line.
"""

from __future__ import annotations

import argparse
import sys

from .generate import add_sampling_args, warn_to_stderr

EXIT_WORDS = ("exit", "quit")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="interactive chat with an instruction-tuned checkpoint")
    add_sampling_args(p, max_new_tokens=128)
    p.add_argument(
        "--no-history",
        action="store_true",
        help="answer each question on its own (default: earlier turns stay in context)",
    )


def enable_line_editing() -> bool:
    """Importing ``readline`` makes ``input()`` edit the line and recall earlier questions
    (without it the Up arrow reaches the model as ``^[[A``); False where Python has none
    (Windows without pyreadline)."""
    try:
        import readline  # noqa: F401
    except ImportError:
        return False
    return True


def _questions(interactive: bool):
    """Yield questions until exit/quit, end of input or Ctrl-C."""
    while True:
        try:
            line = input("You: ") if interactive else sys.stdin.readline()
        except (EOFError, KeyboardInterrupt):
            if interactive:
                print()
            return
        if not interactive and line == "":
            return  # end of input
        text = line.strip()
        if text.lower() in EXIT_WORDS:
            return
        if text:
            yield text


def run(args: argparse.Namespace) -> int:
    from ..errors import UserError
    from ..generate import ChatSession, SamplingParams, load

    if sys.stdin is None or sys.stdin.closed:  # started with `<&-`: nothing to read questions from
        raise UserError(
            "standard input is closed; run chat in a terminal or pipe questions into it "
            "(echo 'hello' | archlab chat ...)"
        )
    SamplingParams(args.temperature, args.top_k, args.top_p, args.greedy)  # validate first
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens: must be >= 1 (got {args.max_new_tokens})")
    loaded = load(args.checkpoint, device=args.device)
    session = ChatSession(
        loaded,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        greedy=args.greedy,
        seed=args.seed,
        keep_history=not args.no_history,
        warn=warn_to_stderr("chat"),
    )
    interactive = sys.stdin.isatty()
    if interactive:
        enable_line_editing()
        print(
            f"Chatting with {loaded.path} ({loaded.config.architecture}, context "
            f"{loaded.config.max_seq_len} tokens). Type 'exit' or press Ctrl-D to quit."
        )

    def stream(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    try:
        for question in _questions(interactive):
            sys.stdout.write("Assistant: ")
            sys.stdout.flush()
            session.ask(question, stream=stream)
            sys.stdout.write("\n")
            sys.stdout.flush()
    except KeyboardInterrupt:  # Ctrl-C while an answer streams: end cleanly
        sys.stdout.write("\n")
        sys.stdout.flush()
    return 0
