/* drivers/scsi/storvsc_drv.c: the Hyper-V synthetic SCSI (storvsc) driver. */
#include "modinfo.h"

static int storvsc_ringbuffer_size __attribute__((used)) = 128 * 1024;
static unsigned int storvsc_max_hw_queues __attribute__((used));

MODULE_PARM_DESC(storvsc_ringbuffer_size, "Ring buffer size (bytes)");
MODULE_PARM_TYPE(storvsc_ringbuffer_size, "int");
MODULE_PARM_DESC(storvsc_max_hw_queues, "Maximum number of hardware queues");
MODULE_PARM_TYPE(storvsc_max_hw_queues, "uint");
MODULE_DESCRIPTION("Microsoft Hyper-V virtual storage driver");
MODULE_LICENSE("GPL");
MODULE_MODPOST("");
MODULE_STUB_INIT
