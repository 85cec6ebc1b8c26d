from minift.cli import main

raise SystemExit(main())
