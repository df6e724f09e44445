// skipdeploy.hpp: a small C++17 RAII wrapper over the skipdeploy C API (header only).
//
//   skipdeploy::Runtime rt("path/to/export", R"({"max_batch": 4})");
//   std::vector<int64_t> ids = rt.generate({2, 100, 200}, R"({"max_new_tokens": 16})");
//   rt.stream({2, 100}, "", [](int64_t token) { std::cout << token << "\n"; return true; });
//   std::string text = rt.generate_text("def fib(n):");
//
// Failures throw skipdeploy::Error (its status() is the sd_status). A Runtime is movable, not
// copyable; its destructor calls sd_free. It may be used from many threads at once.
#pragma once

#include <skipdeploy.h>

#include <cstdint>
#include <exception>
#include <functional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace skipdeploy {

class Error : public std::runtime_error {
public:
    Error(sd_status status, const std::string &message)
        : std::runtime_error(std::string(sd_status_name(status)) + ": " + message), status_(status) {}
    sd_status status() const noexcept { return status_; }

private:
    sd_status status_;
};

inline void check(sd_status status)
{
    if (status != SD_OK)
        throw Error(status, sd_last_error());
}

inline const char *json_or_null(const std::string &json) { return json.empty() ? nullptr : json.c_str(); }

class Runtime {
public:
    // options_json: "" for the defaults, else a JSON object (see docs/c-api.md).
    explicit Runtime(const std::string &export_dir, const std::string &options_json = "")
    {
        check(sd_load(export_dir.c_str(), json_or_null(options_json), &rt_));
    }
    ~Runtime() { sd_free(rt_); }
    Runtime(Runtime &&other) noexcept : rt_(std::exchange(other.rt_, nullptr)) {}
    Runtime &operator=(Runtime &&other) noexcept
    {
        if (this != &other) {
            sd_free(rt_);
            rt_ = std::exchange(other.rt_, nullptr);
        }
        return *this;
    }
    Runtime(const Runtime &) = delete;
    Runtime &operator=(const Runtime &) = delete;

    sd_runtime *get() const noexcept { return rt_; }

    // The generated ids. Collected from the stream, so no output size has to be guessed.
    std::vector<int64_t> generate(const std::vector<int64_t> &prompt, const std::string &params_json = "") const
    {
        std::vector<int64_t> out;
        stream(prompt, params_json, [&out](int64_t token) { out.push_back(token); return true; });
        return out;
    }

    // The generated ids into a caller-sized buffer through sd_generate (capacity: at most this
    // many ids; a longer result throws Error with status SD_ERR_BUFFER).
    std::vector<int64_t> generate_into(const std::vector<int64_t> &prompt, const std::string &params_json,
                                       size_t capacity) const
    {
        std::vector<int64_t> out(capacity);
        size_t n = 0;
        check(sd_generate(rt_, prompt.data(), prompt.size(), json_or_null(params_json), out.data(), out.size(), &n));
        out.resize(n);
        return out;
    }

    // on_token(token) per generated token; return false to stop early. An exception thrown by
    // on_token stops the generation and is rethrown here.
    void stream(const std::vector<int64_t> &prompt, const std::string &params_json,
                const std::function<bool(int64_t)> &on_token) const
    {
        struct Context {
            const std::function<bool(int64_t)> *fn;
            std::exception_ptr error;
        } context{&on_token, nullptr};
        auto trampoline = [](int64_t token, void *user) -> int {
            auto *ctx = static_cast<Context *>(user);
            try {
                return (*ctx->fn)(token) ? 0 : 1;
            } catch (...) {  // never unwind through C and Python frames
                ctx->error = std::current_exception();
                return 1;
            }
        };
        sd_status status = sd_generate_stream(rt_, prompt.data(), prompt.size(), json_or_null(params_json),
                                              trampoline, &context);
        if (context.error)
            std::rethrow_exception(context.error);
        check(status);
    }

    // Text in, generated text out (needs an export with a tokenizer). With sampling, give a
    // seed: a result longer than the first buffer is generated again into a larger one.
    std::string generate_text(const std::string &prompt, const std::string &params_json = "") const
    {
        return text_call([&](char *out, size_t cap, size_t *len) {
            return sd_generate_text(rt_, prompt.c_str(), json_or_null(params_json), out, cap, len);
        });
    }

    std::vector<int64_t> tokenize(const std::string &text) const
    {
        std::vector<int64_t> out(text.size() + 8);
        size_t n = 0;
        sd_status status = sd_tokenize(rt_, text.c_str(), out.data(), out.size(), &n);
        if (status == SD_ERR_BUFFER) {
            out.resize(n);
            status = sd_tokenize(rt_, text.c_str(), out.data(), out.size(), &n);
        }
        check(status);
        out.resize(n);
        return out;
    }

    std::string detokenize(const std::vector<int64_t> &ids) const
    {
        return text_call([&](char *out, size_t cap, size_t *len) {
            return sd_detokenize(rt_, ids.data(), ids.size(), out, cap, len);
        });
    }

    // A JSON object: num_layers, vocab_size, max_length, eos_token_id, schedule, ...
    std::string info() const
    {
        return text_call([&](char *out, size_t cap, size_t *len) { return sd_runtime_info(rt_, out, cap, len); });
    }

private:
    template <typename Call> static std::string text_call(Call call)
    {
        std::string out(4096, '\0');
        size_t n = 0;
        sd_status status = call(&out[0], out.size(), &n);
        if (status == SD_ERR_BUFFER) {  // n is the length without the NUL
            out.assign(n + 1, '\0');
            status = call(&out[0], out.size(), &n);
        }
        check(status);
        out.resize(n);
        return out;
    }

    sd_runtime *rt_ = nullptr;
};

}  // namespace skipdeploy
