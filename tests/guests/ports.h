/* I/O ports the test guests use (4 apart so 32-bit accesses fit one bus device); parsed by build.py for the tests. */
#define PORT_IN       0xE0      /* echo: values to echo */
#define PORT_OUT      0xE4      /* every guest: values it reports */
#define PORT_STR_OUT  0xE8      /* echo: rep outsb target */
#define PORT_STR_IN   0xEC      /* echo: rep insw source */
#define PORT_RESULT   0xD0      /* echo: the words read by rep insw */
#define PORT_IRQ      0xD4      /* irq: the interrupt handler's running count */
#define PORT_DONE     0xDC      /* guest finished its script */
#define FAULT_PORT    0xF8      /* guest.h exception report: vector, error code, RIP */
