/* drivers/pci/controller/pci-hyperv-intf.c: the interface pci-hyperv exports to hv drivers. */
#include "modinfo.h"

MODULE_DESCRIPTION("Hyper-V PCI Interface");
MODULE_LICENSE("GPL");
MODULE_MODPOST("");
MODULE_STUB_INIT
