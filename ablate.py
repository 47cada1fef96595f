"""Entry for `accelerate launch ablate.py --target "Grumpy Cat" --anchor "Cat"` (= `ablate train ...`)."""

import sys

from ablation.train_cli import main, process_start

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], started_at=process_start()))
