/* Profiling aid (scripts/tcg-profile/README.md; not part of the product): a QEMU TCG plugin
 * that counts executions of every translation block with inline counters; a helper thread
 * writes the cumulative counts ("pc insns execs" per block) to $TBCOUNT_DIR/dump.<n> whenever
 * the file $TBCOUNT_DIR/trigger appears, and removes the trigger. */
#include <glib.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
#include <pthread.h>
#include <qemu-plugin.h>

QEMU_PLUGIN_EXPORT int qemu_plugin_version = QEMU_PLUGIN_VERSION;

typedef struct { uint64_t pc; uint64_t n; uint64_t count; } Entry;
static GHashTable *table;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static const char *dir = "/tmp/prof";

static void tb_trans(qemu_plugin_id_t id, struct qemu_plugin_tb *tb)
{
    uint64_t pc = qemu_plugin_tb_vaddr(tb);
    uint64_t n = qemu_plugin_tb_n_insns(tb);
    uint64_t key = pc ^ (n << 56);
    pthread_mutex_lock(&lock);
    Entry *e = g_hash_table_lookup(table, &key);
    if (!e) {
        e = g_new0(Entry, 1);
        e->pc = pc; e->n = n;
        uint64_t *k = g_new(uint64_t, 1); *k = key;
        g_hash_table_insert(table, k, e);
    }
    pthread_mutex_unlock(&lock);
    qemu_plugin_register_vcpu_tb_exec_inline(tb, QEMU_PLUGIN_INLINE_ADD_U64, &e->count, 1);
}

static void *watcher(void *arg)
{
    char trig[512], out[512];
    int k = 0;
    snprintf(trig, sizeof trig, "%s/trigger", dir);
    for (;;) {
        usleep(20000);
        if (access(trig, F_OK) != 0) continue;
        unlink(trig);
        snprintf(out, sizeof out, "%s/dump.%d", dir, k++);
        FILE *f = fopen(out, "w");
        if (!f) continue;
        pthread_mutex_lock(&lock);
        GHashTableIter it; gpointer key, val;
        g_hash_table_iter_init(&it, table);
        while (g_hash_table_iter_next(&it, &key, &val)) {
            Entry *e = val;
            if (e->count) fprintf(f, "%lx %lu %lu\n", (unsigned long)e->pc, (unsigned long)e->n, (unsigned long)e->count);
        }
        pthread_mutex_unlock(&lock);
        fclose(f);
    }
    return NULL;
}

QEMU_PLUGIN_EXPORT int qemu_plugin_install(qemu_plugin_id_t id, const qemu_info_t *info,
                                           int argc, char **argv)
{
    const char *d = getenv("TBCOUNT_DIR");
    if (d) dir = d;
    table = g_hash_table_new(g_int64_hash, g_int64_equal);
    qemu_plugin_register_vcpu_tb_trans_cb(id, tb_trans);
    pthread_t t;
    pthread_create(&t, NULL, watcher, NULL);
    return 0;
}
