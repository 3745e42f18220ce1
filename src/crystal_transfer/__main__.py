from crystal_transfer.cli import main

raise SystemExit(main())
