"""python -m convert --kind dit --src <file|dir> --out <orbax dir> [--config i2v-14b] [--dtype bfloat16]"""

from convert.cli import main

if __name__ == "__main__":
  raise SystemExit(main())
