/* generate: load an export and generate token ids through the skipdeploy C API.
 *
 *   generate EXPORT_DIR [--params JSON] [--options JSON] [TOKEN_ID ...]
 *
 * Token ids are separate arguments ("2 100 200") or comma-separated ("2,100,200").
 * Prints the generated ids twice, comma-separated: once from sd_generate, once as
 * sd_generate_stream delivers them:
 *
 *   tokens: 17,301,45
 *   stream: 17,301,45
 *
 * Without token ids it uses the prompt 2,100,200. Exit status 1 on an error (printed on stderr).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <skipdeploy.h>

static int print_token(int64_t token, void *user)
{
    int *count = (int *)user;
    printf("%s%lld", *count ? "," : "", (long long)token);
    fflush(stdout);  /* show each token as it arrives */
    ++*count;
    return 0;        /* non-zero would stop the generation */
}

/* The message belongs to the thread's last sd_* call: print it before sd_free. */
static int fail(const char *what, sd_status status, sd_runtime *rt)
{
    fprintf(stderr, "generate: %s failed: %s: %s\n", what, sd_status_name(status), sd_last_error());
    sd_free(rt);
    return 1;
}

int main(int argc, char **argv)
{
    const char *params = NULL, *options = NULL;
    int64_t prompt[512] = {2, 100, 200};
    size_t prompt_len = 0;

    if (argc < 2 || strcmp(argv[1], "-h") == 0 || strcmp(argv[1], "--help") == 0) {
        fprintf(stderr, "usage: %s EXPORT_DIR [--params JSON] [--options JSON] [TOKEN_ID ... | ID,ID,...]\n",
                argv[0]);
        return 2;
    }
    for (int i = 2; i < argc; i++) {
        if (strcmp(argv[i], "--params") == 0 && i + 1 < argc) {
            params = argv[++i];
        } else if (strcmp(argv[i], "--options") == 0 && i + 1 < argc) {
            options = argv[++i];
        } else {
            /* "2 100 200" or "2,100,200" (the skipdeploy CLI's --input-ids form), or both mixed */
            const char *p = argv[i];
            for (;;) {
                char *end;
                if (prompt_len == sizeof prompt / sizeof prompt[0]) {
                    fprintf(stderr, "generate: at most %zu prompt tokens\n", prompt_len);
                    return 2;
                }
                long long id = strtoll(p, &end, 10);
                if (end == p || (*end != '\0' && *end != ',')) {
                    fprintf(stderr, "generate: %s is not a token id or a comma-separated list of them\n", argv[i]);
                    return 2;
                }
                prompt[prompt_len++] = id;
                if (*end == '\0')
                    break;
                p = end + 1;
            }
        }
    }
    if (prompt_len == 0)
        prompt_len = 3;
    fprintf(stderr, "skipdeploy C API %s\n", sd_version());

    sd_runtime *rt = NULL;
    sd_status status = sd_load(argv[1], options, &rt);
    if (status != SD_OK)
        return fail("sd_load", status, NULL);

    int64_t tokens[256];
    size_t n = 0;
    status = sd_generate(rt, prompt, prompt_len, params, tokens, sizeof tokens / sizeof tokens[0], &n);
    if (status != SD_OK)
        return fail("sd_generate", status, rt);
    printf("tokens: ");
    for (size_t i = 0; i < n; i++)
        printf("%s%lld", i ? "," : "", (long long)tokens[i]);
    printf("\n");

    int count = 0;
    printf("stream: ");
    status = sd_generate_stream(rt, prompt, prompt_len, params, print_token, &count);
    printf("\n");
    if (status != SD_OK)
        return fail("sd_generate_stream", status, rt);
    sd_free(rt);  /* stops the engine's thread: do it before the process exits */
    return 0;
}
