"""What several test modules share: fake data written the published way, the host-read
guard, reference batches, small model batches and checks, method budgets. Test modules
import from here, never from one another (tests/test_architecture.py checks it)."""
