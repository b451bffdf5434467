"""Turn a terminal's coloured output (ANSI, on stdin) into an SVG picture, for the README.

    FORCE_COLOR=1 COLORTERM=truecolor flexi generate --show-layers "..." | python docs/terminal_svg.py > out.svg
"""

import sys

from rich.console import Console
from rich.text import Text

console = Console(record=True, width=int(sys.argv[1]) if len(sys.argv) > 1 else 100, file=open("/dev/null", "w"))
console.print(Text.from_ansi(sys.stdin.read()))
sys.stdout.write(console.export_svg(title="flexi generate --show-layers"))
