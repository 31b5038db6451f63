from scaleinfer.cli import main

raise SystemExit(main())
