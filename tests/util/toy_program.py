"""dials.spread_toy: a throwaway program that exercises spread_dials.util.program in tests.

Examples::

  python toy_program.py greeting=hello
  python toy_program.py toy.phil fail=True
"""

from __future__ import annotations

import logging

from libtbx.phil import parse

from spread_dials.util.atomic import write_text_atomic
from spread_dials.util.program import Program, SpreadError, handle_errors

logger = logging.getLogger("dials.spread.toy")

phil_scope = parse(
    """
include scope spread_dials.phil.common.device_phil
include scope spread_dials.phil.common.mp_phil
include scope spread_dials.phil.common.output_phil
include scope spread_dials.phil.common.random_phil
greeting = hi
  .type = str
  .help = "Text to log and write to <output.directory>/toy.txt"
fail = False
  .type = bool
  .help = "Raise a SpreadError inside run"
fail_after_accept = False
  .type = bool
  .help = "Raise a SpreadError after accepting the inputs"
secret = 3
  .type = int
  .help = "An expert-only parameter"
  .expert_level = 2
""",
    process_includes=True,
)

program = Program("dials.spread_toy", usage="dials.spread_toy [options] [toy.phil]", help=__doc__, phil=phil_scope)


@handle_errors
def run(args=None, phil=phil_scope):
    ctx = program.start(args, phil=phil)
    params = ctx.params
    if params.fail:
        raise SpreadError(f"toy failure requested (greeting={params.greeting})")
    ctx.accept_inputs()
    logger.info("toy greeting: %s (seed %d, device %s)", params.greeting, params.random.seed, ctx.device)
    if params.fail_after_accept:
        raise SpreadError("toy failure after its inputs were accepted")
    write_text_atomic(ctx.output_path("toy.txt"), f"{params.greeting}\n{ctx.device}\n{ctx.dtype}\n")


if __name__ == "__main__":
    run()
