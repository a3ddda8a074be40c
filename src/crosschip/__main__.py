from crosschip.cli import main

raise SystemExit(main())
