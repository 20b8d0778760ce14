/* Linux x86 boot protocol: the zero page and its e820 map. */
#include "shim.h"
#include "log.h"
#include "util.h"

_Static_assert(sizeof(struct boot_params) == 4096, "boot_params must be one page");
_Static_assert(__builtin_offsetof(struct boot_params, hdr) == 0x1f1, "setup_header offset");
_Static_assert(__builtin_offsetof(struct boot_params, e820_table) == 0x2d0, "e820_table offset");

void fill_boot_params(struct boot_params *bp, const struct boot_inputs *in)
{
    memset(bp, 0, sizeof(*bp));
    struct setup_header *h = &bp->hdr;
    h->boot_flag = 0xAA55;
    h->header = 0x53726448;       /* "HdrS" */
    h->version = 0x020F;
    h->type_of_loader = 0xff;     /* no registered loader id */
    /* Subarch 1: the OpenHCL kernel then skips probing BIOS/ROM areas, which
     * belong to VTL0. */
    h->hardware_subarch = 1;

    h->cmd_line_ptr = (uint32_t)in->cmdline;
    bp->ext_cmd_line_ptr = (uint32_t)(in->cmdline >> 32);
    h->cmdline_size = (uint32_t)in->cmdline_len;

    if (in->initrd_size) {  /* no initrd: ramdisk fields stay 0/0 */
        h->ramdisk_image = (uint32_t)in->initrd;
        bp->ext_ramdisk_image = (uint32_t)(in->initrd >> 32);
        h->ramdisk_size = (uint32_t)in->initrd_size;
        bp->ext_ramdisk_size = (uint32_t)(in->initrd_size >> 32);
    }

    h->setup_data = in->setup_data;
}

struct e820_out {
    struct boot_params *bp;
    struct boot_e820_entry *ext;
    uint32_t ext_max;
    uint32_t count;
};

static void emit(struct e820_out *o, const struct boot_e820_entry *e)
{
    if (o->count < E820_MAX_ENTRIES_ZEROPAGE)
        o->bp->e820_table[o->count] = *e;
    else if (o->count - E820_MAX_ENTRIES_ZEROPAGE < o->ext_max)
        o->ext[o->count - E820_MAX_ENTRIES_ZEROPAGE] = *e;
    else
        panic("too many e820 entries");
    o->count++;
}

uint32_t build_e820(struct boot_params *bp, struct setup_data *ext, uint32_t ext_max, const struct vtl2_map *m)
{
    struct e820_out o = { bp, (struct boot_e820_entry *)(ext + 1), ext_max, 0 };
    struct boot_e820_entry cur = { 0, 0, 0 };
    int have = 0;

    /* Pieces are sorted and contiguous; neighbours of the same e820 type
     * (e.g. two touching reserved kinds) merge into one entry. */
    for (uint32_t i = 0; i < m->npieces; i++) {
        const struct vtl2_piece *p = &m->pieces[i];
        uint32_t type = p->type == MEMORY_VTL_TYPE_VTL2_RAM ? E820_RAM : E820_RESERVED;
        if (have && cur.type == type && cur.addr + cur.size == p->start) {
            cur.size += p->end - p->start;
            continue;
        }
        if (have)
            emit(&o, &cur);
        cur.addr = p->start;
        cur.size = p->end - p->start;
        cur.type = type;
        have = 1;
    }
    if (have)
        emit(&o, &cur);

    uint32_t in_ext = o.count > E820_MAX_ENTRIES_ZEROPAGE ? o.count - E820_MAX_ENTRIES_ZEROPAGE : 0;
    bp->e820_entries = (uint8_t)(o.count - in_ext);
    ext->next = 0;
    ext->type = SETUP_E820_EXT;
    ext->len = in_ext * (uint32_t)sizeof(struct boot_e820_entry);
    return in_ext;
}
