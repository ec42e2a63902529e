"""`python -m dt_lora` runs the dt-lora command line."""

from dt_lora.cli import main

raise SystemExit(main())
