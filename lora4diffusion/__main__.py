from lora4diffusion.cli import main

raise SystemExit(main())
