from secure_ml.cli import main

raise SystemExit(main())
