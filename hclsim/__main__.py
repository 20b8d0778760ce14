import sys
from hclsim.cli import main
sys.exit(main())
