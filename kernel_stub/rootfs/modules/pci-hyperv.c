/* drivers/pci/controller/pci-hyperv.c: the Hyper-V virtual PCI bus (vPCI) driver. */
#include "modinfo.h"

MODULE_DESCRIPTION("Hyper-V PCI");
MODULE_LICENSE("GPL");
MODULE_MODPOST("pci-hyperv-intf");
MODULE_STUB_INIT
