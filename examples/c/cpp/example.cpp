// example: the C++ wrapper (skipdeploy.hpp) over the skipdeploy C API.
//
//   example EXPORT_DIR [--params JSON] [TOKEN_ID ...]
//
// Prints the generated ids (comma-separated) from generate() and from generate_into(), the
// export's description, and, when the export has a tokenizer, a text completion:
//
//   tokens: 17,301,45
//   buffer: 17,301,45
//   info: {"version": "0.1.0", ...}
//   text: "..."
#include "skipdeploy.hpp"

#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <string>
#include <vector>

static std::string join(const std::vector<int64_t> &ids)
{
    std::string out;
    for (size_t i = 0; i < ids.size(); i++)
        out += (i ? "," : "") + std::to_string(ids[i]);
    return out;
}

static std::string quoted(const std::string &text)  // one line, for printing
{
    std::string out = "\"";
    for (char c : text) {
        if (c == '\n') out += "\\n";
        else if (c == '"' || c == '\\') out += std::string("\\") + c;
        else out += c;
    }
    return out + "\"";
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        std::cerr << "usage: " << argv[0] << " EXPORT_DIR [--params JSON] [TOKEN_ID ...]\n";
        return 2;
    }
    std::string params;
    std::vector<int64_t> prompt;
    for (int i = 2; i < argc; i++) {
        std::string arg = argv[i];
        if (arg == "--params" && i + 1 < argc)
            params = argv[++i];
        else
            prompt.push_back(std::strtoll(arg.c_str(), nullptr, 10));
    }
    if (prompt.empty())
        prompt = {2, 100, 200};
    try {
        skipdeploy::Runtime rt(argv[1]);  // sd_free runs when rt goes out of scope
        std::cout << "tokens: " << join(rt.generate(prompt, params)) << "\n";
        std::cout << "buffer: " << join(rt.generate_into(prompt, params, 1024)) << "\n";
        std::string info = rt.info();
        std::cout << "info: " << info << "\n";
        if (info.find("\"has_tokenizer\": true") != std::string::npos)
            std::cout << "text: " << quoted(rt.generate_text("def greet(name):", R"({"max_new_tokens": 8})")) << "\n";
    } catch (const skipdeploy::Error &e) {
        std::cerr << "example: " << e.what() << "\n";
        return 1;
    }
    return 0;
}
