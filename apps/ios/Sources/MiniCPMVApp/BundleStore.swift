import Foundation
import MiniCPMVCore

/// Finds the Core ML bundle the user copied into the app's Documents folder (Files app ->
/// On My iPhone -> MiniCPM-V): the first folder, at the top level or one below, whose manifest.json
/// is a coreml bundle this app reads.
enum BundleStore {
    static var documents: URL {
        FileManager.default.urls(for: .documentDirectory, in: .userDomainMask)[0]
    }

    struct Found {
        let url: URL
        let manifest: BundleManifest
    }

    /// The bundles found, and one line per folder that has a manifest this app refuses (shown in the UI).
    static func scan() -> (bundles: [Found], problems: [String]) {
        let fm = FileManager.default
        var candidates = [documents]
        let top = (try? fm.contentsOfDirectory(at: documents, includingPropertiesForKeys: [.isDirectoryKey])) ?? []
        for dir in top where (try? dir.resourceValues(forKeys: [.isDirectoryKey]).isDirectory) == true {
            candidates.append(dir)
            let inner = (try? fm.contentsOfDirectory(at: dir, includingPropertiesForKeys: [.isDirectoryKey])) ?? []
            candidates += inner.filter { (try? $0.resourceValues(forKeys: [.isDirectoryKey]).isDirectory) == true }
        }
        var found = [Found]()
        var problems = [String]()
        for dir in candidates {
            let manifest = dir.appendingPathComponent("manifest.json")
            guard let data = try? Data(contentsOf: manifest) else { continue }
            do {
                found.append(
                    Found(
                        url: dir,
                        manifest: try BundleManifest(data: data, where: "\(dir.lastPathComponent)/manifest.json")))
            } catch {
                problems.append("\(error)")
            }
        }
        return (found.sorted { $0.url.lastPathComponent < $1.url.lastPathComponent }, problems)
    }

    /// Writes a device report into Documents (visible in the Files app); returns its URL.
    static func save(report: String) throws -> URL {
        let stamp = ISO8601DateFormatter().string(from: Date()).replacingOccurrences(of: ":", with: "-")
        let url = documents.appendingPathComponent("device-report-\(stamp).json")
        try report.write(to: url, atomically: true, encoding: .utf8)
        return url
    }
}
